"""What the parity suite compares: the architectures, the tiers they run in, the tolerances.

An :class:`Arch` is one network built in both frameworks: a registered flaxres name (plus
overrides such as ``shortcut="C"``) against :func:`parity.reference.create_torch_model`, or one of
the tiny nets of ``TRAJ_TINY``, one per block kind, small enough for 20 training steps in the
default tier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torchvision
from flax import nnx

import flaxres
from flaxres.registry import IMAGENET_WIDTHS
from parity import reference


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """``steps`` of SGD (momentum, weight decay) at ``lr``: a constant warm-up at lr/10 for
    ``warmup`` steps, then MultiStepLR dropping by 10 at each of ``boundaries``."""

    steps: int
    warmup: int
    boundaries: tuple[int, ...]
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-3

    @property
    def probed_steps(self) -> tuple[int, ...]:
        """Where the fp32 trajectory is probed (``Case.check_trajectory_steps``): the first
        step, the first at the full lr, the first after each drop, the last."""
        return tuple(sorted({0, self.warmup, *self.boundaries, self.steps - 1}))


# The tiny nets' trajectory: the proof of the schedule, momentum and weight decay, at an lr and
# weight decay where dropping momentum or weight decay moves the result far beyond the tolerance
# (parity/test_trajectory.py checks that on PyTorch alone).
TRAJ_TINY_PLAN = Trajectory(steps=20, warmup=3, boundaries=(10, 15))
# The registered nets' (``pytest --full``): their own code over a warm-up step, steps at the full
# lr with momentum, and a drop; the tiny nets prove the schedule itself, and 20 steps of every
# registered net took most of the full matrix's 38 minutes on two cores.
TRAJ_SHORT = Trajectory(steps=5, warmup=1, boundaries=(3,))
# The ImageNet-stem nets at batch 2 of 64x64 (a 2x2 map in the last stage): the fc layer's step
# grows with its 512-2048 input features' squared norm, and at lr 0.05 one step took resnet50's
# loss from 1.7 to 70 and a later one to 3e-7, where the relative loss error is rounding alone
# (PyTorch fp32 itself 19% off float64; resnet34's float64 trajectories 100% apart at step 3):
# the steps then say nothing. At 1e-4 resnet50's losses stay between 0.9 and 3.
TRAJ_GENTLE = dataclasses.replace(TRAJ_SHORT, lr=1e-4)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A network in both frameworks, the input it is checked at and its trajectory."""

    id: str
    build_flax: Callable[..., flaxres.ResNet]  # (dtype=, param_dtype=) -> fresh model
    build_torch: Callable[[], torch.nn.Module]  # fresh PyTorch reference
    batch: int  # > 1: train-mode BatchNorm needs a batch
    hw: int
    trajectory: Trajectory = TRAJ_TINY_PLAN


def input_size(name: str) -> tuple[int, int]:
    """(batch, height=width): small inputs, chosen so that equal blocks see equal shapes across
    nets and share one compiled executable (the CIFAR family at 4x16x16; the ImageNet stem at
    64, which leaves a 2x2 map for the head's mean pool, and the ``_cifar`` variants at 2x16x16
    give their stages the same shapes)."""
    if name.startswith("resnext29"):
        return 4, 8
    if flaxres.model_stem(name) == "imagenet":
        return 2, 64
    if name.endswith("_cifar"):
        return 2, 16
    return 4, 16


def registered(name: str, **overrides) -> Arch:
    cid = name + "".join(f"[{k}={v}]" for k, v in overrides.items())
    # 10 classes in both frameworks, ImageNet nets too: the head's size proves nothing more.
    return Arch(cid, lambda **kw: flaxres.create_model(name, num_classes=10, **overrides, **kw),
                lambda: reference.create_torch_model(name, **overrides), *input_size(name),
                TRAJ_GENTLE if flaxres.model_stem(name) == "imagenet" else TRAJ_SHORT)


# Every registered net plus the no-BN and shortcut variants.
CASES: list[Arch] = [registered(n) for n in flaxres.list_models()] + [
    registered("resnet20", norm=False), registered("plain20", norm=False),
    registered("resnet20", shortcut="B"), registered("resnet20", shortcut="C")]
BY_ID = {a.id: a for a in CASES}

# The representative set of the default tier (the float64 proof, and the checks marked
# ``representative``, whose code does not depend on the net: eval mode, features, SGD, checkpoint
# files): a BasicBlock net, a bottleneck net (with the ImageNet stem), a ResNeXt and a plain net
# without BatchNorm. Shortcuts B and C get their float64 proof from the tiny trajectories.
REPRESENTATIVE = frozenset({"resnet20", "resnet50", "resnext29_8x64d", "plain20[norm=False]"})
# Nets whose per-net fp32 checks run with ``--full`` only, which keeps the default tier within
# its 8 minutes on two cores: the zoo's wide, pre-activation and 64x4d nets (the default tier
# proves their block kinds on TRAJ_TINY's pre-activation nets, in float64), and the
# deepest nets of each family, whose blocks the default tier checks in a shallower net of the
# same kind (resnet50 for the ImageNet 101 and 152 layers, resnet50_cifar for the CIFAR
# bottleneck nets resnet101/152_cifar and resnet164, resnet110 for resnet1202, resnext29_8x64d
# with resnet50's ImageNet stem for the other ResNeXts); these took a third of a cold default
# tier.
FULL_ONLY = frozenset({"wide_resnet50_2", "wide_resnet101_2", "resnext101_64x4d",
                       "preact_resnet18", "preact_resnet110", "preact_resnet164", "wrn28_10",
                       "wrn16_8", "wrn40_4", "resnet101", "resnet152", "resnet101_cifar",
                       "resnet152_cifar", "resnet164", "resnet1202", "resnext50_32x4d",
                       "resnext101_32x8d", "resnext29_16x64d"})
# The jitted-blocks path against the plain un-jitted model: every stem, block and norm kind.
BLOCKWISE_DEFAULT = ("resnet20", "plain20[norm=False]", "resnet20[shortcut=C]")
BLOCKWISE_FULL = ("resnet18", "resnext29_8x64d", "resnet164")


def _tiny(cid: str, flax_fn: Callable[..., flaxres.ResNet], torch_fn: Callable[[], torch.nn.Module],
          batch: int = 4, hw: int = 8) -> Arch:
    return Arch(cid, lambda **kw: flax_fn(rngs=nnx.Rngs(0), **kw), torch_fn, batch, hw)


# One tiny net per block kind for the default tier's trajectories.
TRAJ_TINY: list[Arch] = [
    _tiny("tiny-basic-A", lambda **kw: flaxres.cifar_resnet(8, **kw),
          lambda: reference.create_torch_model("resnet8")),
    _tiny("tiny-basic-B", lambda **kw: flaxres.cifar_resnet(8, shortcut="B", **kw),
          lambda: reference.create_torch_model("resnet8", shortcut="B")),
    _tiny("tiny-basic-C", lambda **kw: flaxres.cifar_resnet(8, shortcut="C", **kw),
          lambda: reference.create_torch_model("resnet8", shortcut="C")),
    _tiny("tiny-plain-noBN", lambda **kw: flaxres.cifar_resnet(8, shortcut=None, norm=False, **kw),
          lambda: reference.create_torch_model("plain8", norm=False)),
    _tiny("tiny-bottleneck-B", lambda **kw: flaxres.cifar_resnet(11, bottleneck=True, **kw),
          lambda: reference.CifarResNet(reference.Bottleneck, (1, 1, 1), (16, 32, 64), 16,
                                        shortcut="B")),
    _tiny("tiny-resnext-4x4d", lambda **kw: flaxres.resnext((1, 1, 1), 4, 4, stem="cifar", **kw),
          lambda: reference.CifarResNet(reference.Bottleneck, (1, 1, 1), (64, 128, 256), 64,
                                        shortcut="B", groups=4, width_per_group=4)),
    _tiny("tiny-preact-basic", lambda **kw: flaxres.registry.wide_resnet_cifar(10, 1, **kw),
          lambda: reference.create_torch_model("wrn10_1")),
    _tiny("tiny-preact-bottleneck", lambda **kw: flaxres.cifar_resnet(
        11, bottleneck=True, preact=True, head_norm=True, **kw),
          lambda: reference.PreActResNet(reference.PreActBottleneck, (1, 1, 1), (16, 32, 64), 16)),
    _tiny("tiny-imagenet-stem", lambda **kw: flaxres.ResNet(
        flaxres.BasicBlock, (1, 1, 1, 1), IMAGENET_WIDTHS, stem="imagenet", stem_width=64,
        shortcut="B", **kw),
          lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock,
                                                   [1, 1, 1, 1], num_classes=10),
          batch=2, hw=64),
]

TOL = {"schedule": 1e-6, "eval": 1e-5, "train": 1e-5, "features": 1e-5, "grads": 1e-4,
       "optim": 1e-6, "traj_loss": 1e-4, "traj_state": 1e-3, "checkpoint": 1e-5,
       "blockwise": 1e-5, "step_loss": 1e-5, "step_state": 1e-5}
PRECISIONS = ("fp32", "fp64")

# Every case draws this many random batches (the longest trajectory's, plus an eval batch and a
# calibration batch), so that a net's data does not depend on its trajectory's length.
BATCHES = TRAJ_TINY_PLAN.steps + 2
# Where PyTorch fp32 itself is this far from float64, one fp32 result says nothing about another
# (chaos): the fp32 check is then an expected failure naming it (parity/test_grads.py), never a
# vacuous pass.
CHAOS_LIMIT = 1e-2
# Where whole float64 trajectories disagree, how far PyTorch float64 moves from initial weights
# moved by this relative amount (float64 rounding's size) says how much the dynamics amplify.
CHAOS_JITTER = 1e-15
