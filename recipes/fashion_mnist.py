"""CIFAR ResNet-20 with one input channel on Fashion-MNIST: the embedded default, runs offline on a CPU.

    python recipes/fashion_mnist.py --arm baseline
    python recipes/fashion_mnist.py --arm gcgd
    python recipes/fashion_mnist.py --arm gcgd --subset full       # all 60000/10000 images (Debian package)

The embedded subset (6000 training / 1000 test images shipped with gcsurgery) is split into 5400
training and 600 validation images; the 28x28 images are padded to 32x32.

Expected result (seed 0, one run per arm, one thread each on a 2-core CPU, about 11 minutes per arm):
baseline best val 90.83% (epoch 25), test 88.70%; gcgd best val 91.67% (epoch 27), test 89.40%, at 1.07x
the step time. One seed on 600 validation images: a gap of this size is within seed-to-seed noise (see the
README's benchmark, which pairs 3-5 seeds).
"""

from train import RunConfig, main

CONFIG = RunConfig(
    model="cifar_resnet20",
    dataset="fashion_mnist",
    subset="embedded",  # "full" for the 60000/10000 images (--data-dir, or apt-get install dataset-fashion-mnist)
    epochs=30,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    augment=True,  # random 4-pixel crops and horizontal flips
    out_dir="runs/fashion_mnist",
)

if __name__ == "__main__":
    main(defaults=CONFIG, doc=__doc__)
