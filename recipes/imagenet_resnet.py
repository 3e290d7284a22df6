"""torchvision ResNet-18 / ResNet-50 on ImageNet-style folders (``train/<class>/``, ``val/<class>/``).

    python recipes/imagenet_resnet.py --data-dir /data/imagenet --arm baseline
    python recipes/imagenet_resnet.py --data-dir /data/imagenet --arm gcgd --model torchvision:resnet50
    torchrun --nproc-per-node 8 recipes/imagenet_resnet.py --data-dir /data/imagenet --batch-size 32 --arm gcgd

``val/`` is the validation set: it picks the best epoch, and its accuracy there is the figure the
torchvision reference reports. A ``test/`` folder with the same classes, when there is one, is the test
set, evaluated once at the best epoch; without it there is no test accuracy (the summary says so).
Batch and lr follow the torchvision reference (256 in total, lr 0.1).

Expected result: not measured yet (it needs ImageNet and GPUs). The torchvision reference weights reach 69.76%
(ResNet-18) and 76.13% (ResNet-50) top-1 on ImageNet-1k val after 90 epochs with a step schedule.
"""

from train import RunConfig, main

CONFIG = RunConfig(
    model="torchvision:resnet18",  # or torchvision:resnet50
    dataset="folders",
    image_size=224,  # random resized crops for training; validation: resize to 256, centre crop 224
    epochs=90,
    batch_size=256,  # per process: with torchrun, divide by the number of processes
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    warmup_epochs=1,  # linear warmup, then cosine to 0
    label_smoothing=0.0,
    amp=True,  # fp16 + GradScaler on CUDA (bf16 autocast on CPU)
    channels_last=True,
    workers=8,
    out_dir="runs/imagenet_resnet",
)

if __name__ == "__main__":
    main(defaults=CONFIG, doc=__doc__)
