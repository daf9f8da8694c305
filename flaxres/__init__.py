"""flaxres: the ResNet family in JAX/Flax NNX, numerically equal to the PyTorch references."""

from flaxres.convert import WeightsError
from flaxres.models import BasicBlock, BatchNorm, Bottleneck, FeatureInfo, PadShortcut, ResNet
from flaxres.ops import CpuOps
from flaxres.pretrained import PretrainedCfg, list_pretrained, pretrained_cfg
from flaxres.registry import (
    ArchCfg,
    cifar_resnet,
    count_params,
    create_model,
    default_cfg,
    imagenet_resnet,
    list_models,
    model_stem,
    register,
    resnext,
)

__all__ = [
    "ArchCfg",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "CpuOps",
    "FeatureInfo",
    "PadShortcut",
    "PretrainedCfg",
    "ResNet",
    "WeightsError",
    "cifar_resnet",
    "count_params",
    "create_model",
    "default_cfg",
    "imagenet_resnet",
    "list_models",
    "list_pretrained",
    "model_stem",
    "pretrained_cfg",
    "register",
    "resnext",
]
