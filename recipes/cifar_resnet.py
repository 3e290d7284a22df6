"""CIFAR ResNet-20 / ResNet-56 on CIFAR-10: the paper's setting (He et al. 2016 ResNets, SGD 0.1, batch 128).

    python recipes/cifar_resnet.py --data-dir ~/data --arm baseline       # ResNet-20
    python recipes/cifar_resnet.py --data-dir ~/data --arm gcgd
    python recipes/cifar_resnet.py --data-dir ~/data --model cifar_resnet56 --arm gcgd

``--data-dir`` holds ``cifar-10-batches-py/`` (cifar-10-python.tar.gz, extracted). Any option of
``recipes/train.py`` overrides these settings, e.g. ``--amp --channels-last`` on a GPU.

Expected result: not measured yet (it needs the CIFAR-10 files, and at about 0.3 s per training step on
2 CPU cores, 200 epochs of ResNet-20 take about 5 hours per arm). For reference, He et al. report 91.25%
(ResNet-20) and 93.03% (ResNet-56) test accuracy with a step schedule and wd 1e-4. What GCGD did on a
smaller task is in the README.
"""

from train import RunConfig, main

CONFIG = RunConfig(
    model="cifar_resnet20",  # cifar_resnet56 for the deeper model of the paper
    dataset="cifar10",
    epochs=200,
    batch_size=128,
    lr=0.1,  # cosine decay per step to 0
    momentum=0.9,
    weight_decay=5e-4,  # He et al. used 1e-4; 5e-4 is the common modern choice and suits cosine decay
    augment=True,  # 4-pixel random crops and horizontal flips, as in He et al.
    val_fraction=0.1,  # 5000 training images held out to pick the best epoch
    out_dir="runs/cifar_resnet",
)

if __name__ == "__main__":
    main(defaults=CONFIG, doc=__doc__)
