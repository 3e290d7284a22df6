"""Any timm model by name (``pretrained=False``), on Fashion-MNIST, CIFAR-10 or image folders.

    python recipes/timm_model.py --arm gcgd                                     # timm:resnet18, Fashion-MNIST
    python recipes/timm_model.py --model timm:convnext_atto --dataset cifar10 --data-dir ~/data --arm gcgd
    python recipes/timm_model.py --model timm:efficientnet_b0 --dataset folders --data-dir /data/imagenette \
        --image-size 160 --arm gcgd

The settings are timm-style (AdamW, warmup, label smoothing), which suits most timm architectures;
``--opt sgd --lr 0.1 --weight-decay 5e-4`` gives the paper's SGD setting instead. Fashion-MNIST
images are padded to 32x32 and fed with one channel (the model is built with ``in_chans=1``).

Expected result: not yet measured with this recipe.
"""

from train import RunConfig, main

CONFIG = RunConfig(
    model="timm:resnet18",  # any name from timm.list_models()
    dataset="fashion_mnist",  # or cifar10 / folders with --data-dir
    subset=None,  # Fashion-MNIST: --data-dir, else the Debian package, else the embedded subset
    epochs=30,
    batch_size=128,
    opt="adamw",
    lr=2e-3,
    weight_decay=0.05,
    warmup_epochs=2,
    label_smoothing=0.1,
    out_dir="runs/timm_model",
)

if __name__ == "__main__":
    main(defaults=CONFIG, doc=__doc__)
