"""The CIFAR nets and `build_model` moved to `gcsurgery.harness.models`; this alias keeps old imports working."""

from .harness.models import CifarPlainNet, CifarResNet, build_model, cifar_plain, cifar_resnet

__all__ = ["CifarPlainNet", "CifarResNet", "build_model", "cifar_plain", "cifar_resnet"]
