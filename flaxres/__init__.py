"""flaxres: the ResNet family in JAX/Flax NNX, numerically equal to the PyTorch references."""

from flaxres.convert import WeightsError
from flaxres.models import BasicBlock, BatchNorm, Bottleneck, FeatureInfo, PadShortcut, ResNet
from flaxres.ops import CpuOps
from flaxres.registry import (
    cifar_resnet,
    count_params,
    create_model,
    imagenet_resnet,
    list_models,
    model_stem,
    register,
    resnext,
)

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "CpuOps",
    "FeatureInfo",
    "PadShortcut",
    "ResNet",
    "WeightsError",
    "cifar_resnet",
    "count_params",
    "create_model",
    "imagenet_resnet",
    "list_models",
    "model_stem",
    "register",
    "resnext",
]
