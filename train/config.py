"""Training configuration: one dataclass, kept apart from the code (as flax's examples keep theirs).

Each field's ``help`` metadata is the ``--help`` text of the flag of the same name
(``batch_size`` -> ``--batch-size``); :func:`add_flags` declares those flags for every command
that shares them (train.cifar all of them, the benchmarks and pytest a few).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optax

from flaxres.registry import CIFAR_MEAN, CIFAR_STD
from train import optim

RECIPES = Path(__file__).resolve().parent / "recipes"


def flag(default, help: str, **kw):
    """A config field whose ``help`` (and argparse options such as ``choices``) make its flag."""
    return field(default=default, metadata={"help": help, **kw})


def recipe_names() -> list[str]:
    """The recipes in train/recipes/, one small file each."""
    return sorted(p.stem for p in RECIPES.glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name: str, config: type | None = None) -> dict[str, Any]:
    """A recipe file's ``RECIPE``: field values of ``config`` (default :class:`Config`) that a
    run takes as its defaults."""
    if name not in recipe_names():
        raise ValueError(f"--recipe {name}: no such recipe; train/recipes/ has "
                         f"{', '.join(recipe_names())}")
    recipe = importlib.import_module(f"train.recipes.{name}").RECIPE
    unknown = set(recipe) - {f.name for f in dataclasses.fields(config or Config)}
    if unknown:
        raise ValueError(f"train/recipes/{name}.py sets unknown fields {sorted(unknown)}")
    return recipe


@dataclass
class Config:
    recipe: str | None = flag(None, "a named recipe from train/recipes/ whose settings become the "
                            f"defaults (explicit flags still win): {', '.join(recipe_names())}")
    arch: str = flag("resnet20", "architecture: any flaxres.list_models() name, or any CIFAR "
                   "resnetN with N = 6n+2 (e.g. resnet8)")
    dataset: str = flag("cifar10", "dataset", choices=("cifar10", "cifar100"))
    data_dir: str | None = flag(None, "data source: an image folder split/class/*.png|jpg (or its "
                              ".tar.gz), the official CIFAR python or binary archive (tarred or "
                              "extracted) or a tfds data_dir; default: tensorflow-datasets' "
                              "default location (downloads when online; offline it stops after "
                              "a 3 s connection probe). A corrupt image or truncated archive "
                              "stops the run with an error naming the file, and nothing is "
                              "cached")
    cache_dir: str | None = flag(None, "where decoded uint8 arrays are cached (default "
                               "$FLAXRES_CACHE or ~/.cache/flaxres)")
    workdir: str = flag("runs/cifar", "output folder: checkpoints/, metrics.jsonl, curves.png")
    epochs: int | None = flag(None, "epochs to train (overrides the schedule's length)")
    steps: int | None = flag(None, "iterations to train (overrides --epochs); default with "
                           "neither: 64000, the paper's")
    batch_size: int = flag(128, "global batch size, split over all devices")
    eval_batch_size: int = flag(1000, "evaluation batch size")
    lr: float = flag(0.1, "base learning rate")
    momentum: float = flag(0.9, "SGD momentum (PyTorch semantics)")
    nesterov: bool = flag(False, "Nesterov momentum")
    weight_decay: float = flag(1e-4, "L2 weight decay added to the gradient (paper 1e-4; the "
                             "popular seeds use 5e-4)")
    schedule: str = flag("paper", "lr schedule: 'paper' = /10 at 50%% and 75%% of training "
                       "(32k and 48k of 64k iterations); 'multistep' = /10 at --milestones "
                       "epochs; 'cosine' = per-iteration cosine decay to 0",
                       choices=("paper", "multistep", "cosine"))
    milestones: tuple[int, ...] | None = flag(None, "multistep epoch milestones (default: 1/2 and "
                                            "3/4 of the epochs, as the course notebook)")
    lr_gamma: float = flag(0.1, "lr factor at each multistep milestone (the Wide ResNets': 0.2)")
    warmup: str = flag("auto", "warm up for the first --warmup-steps iterations; 'auto' = on "
                     f"for {', '.join(optim.WARMUP_ARCHS)} as in the paper",
                     choices=("auto", "on", "off"))
    warmup_steps: int = flag(optim.PAPER_WARMUP_STEPS, "warm-up length in iterations")
    warmup_epochs: int | None = flag(None, "warm-up length in epochs (torchvision's "
                                   "--lr-warmup-epochs); overrides --warmup-steps")
    warmup_method: str = flag("constant", "warm-up lr: 'constant' = --warmup-factor x --lr "
                            "throughout (the paper's); 'linear' = rising from --warmup-factor x "
                            "--lr to --lr (torchvision's LinearLR, per iteration)",
                            choices=("constant", "linear"))
    warmup_factor: float = flag(0.1, "the warm-up's lr, or its starting lr, as a fraction of --lr "
                              "(torchvision's --lr-warmup-decay)")
    label_smoothing: float = flag(0.0, "label smoothing of the training loss, as PyTorch's "
                                "CrossEntropyLoss(label_smoothing=...); evaluation reports the "
                                "plain cross-entropy")
    norm_weight_decay: float | None = flag(None, "weight decay of BatchNorm's scale and bias "
                                         "(torchvision's --norm-weight-decay, e.g. 0); default: "
                                         "--weight-decay")
    bias_weight_decay: float | None = flag(None, "weight decay of every bias, BatchNorm's "
                                         "included (torchvision's --bias-weight-decay); default: "
                                         "as the parameter's layer")
    ema_decay: float = flag(0.0, "keep an exponential moving average of the weights and BatchNorm "
                          "statistics, ema = d x ema + (1 - d) x current every --ema-steps steps, "
                          "evaluated beside the model (0: off; torchvision's --model-ema)")
    ema_steps: int = flag(32, "steps between EMA updates (torchvision's --model-ema-steps)")
    val_split: int = flag(0, "hold out this many training images as a validation set (the "
                        "paper: 5000, i.e. 45k/5k); the best checkpoint is then chosen by "
                        "validation accuracy")
    mean: tuple[float, ...] = flag(CIFAR_MEAN, "normalisation mean (RGB, 0..1 scale)")
    std: tuple[float, ...] = flag(CIFAR_STD, "normalisation std (RGB, 0..1 scale)")
    augment: bool = flag(True, "4-px zero pad + random 32x32 crop + horizontal flip (on device); "
                       "--no-augment turns it off")
    subset: int | None = flag(None, "train on a fixed random N-image subset of the training set, "
                            "the same for every seed (quick runs)")
    seed: int = flag(0, "seed for initial weights, data order, augmentation and the val split")
    dropout: float = flag(0.0, "dropout rate between the convs of each block, for the nets that "
                        "have it (the pre-activation and Wide ResNets: preact_*, wrn*)")
    precision: str = flag("fp32", "compute dtype (parameters stay fp32)", choices=("fp32", "bf16"))
    matmul_precision: str = flag("tf32", "fp32 matmul/convolution precision on GPUs: 'tf32' lets "
                               "them use TensorFloat-32 (as PyTorch's cuDNN convolutions do by "
                               "default), 'highest' computes true fp32; the CPU always computes "
                               "fp32", choices=("tf32", "highest"))
    cpu_conv: str | None = flag(None, "who runs fp32 convolutions and BatchNorm on the CPU: "
                              "'onednn' (oneDNN through jax.ffi, needs the C++ extension; "
                              "docs/onednn.md) or 'xla'; default: onednn where the extension is "
                              "built, else xla; other platforms always use their own",
                              choices=("xla", "onednn"))
    log_every: int = flag(20, "progress-bar refresh interval in steps (each refresh syncs)")
    init_from: str | None = flag(None, "start from these weights: a .pth/.pt/.th (torchvision, "
                               "akamaster or kuangliu layout), .safetensors, Orbax workdir or "
                               "https:// / file:// URL; a head for other classes is replaced by "
                               "a fresh one (fine-tuning)")
    freeze_backbone: bool = flag(False, "with --init-from: train only the classifier head (fc); "
                               "BatchNorm statistics still adapt, as in PyTorch")
    resume: bool = flag(False, "continue from <workdir>/checkpoints/last")
    eval_only: bool = flag(False, "only evaluate --checkpoint on the test set")
    checkpoint: str | None = flag(None, "checkpoint for --eval-only / --predict: a workdir, its "
                                "checkpoints/ folder, or checkpoints/last|best")
    predict: tuple[str, ...] | None = flag(None, "image files to classify with --checkpoint; prints "
                                         "the top-k classes with probabilities")
    top_k: int = flag(5, "classes shown per image by --predict")
    plot: bool = flag(True, "write <workdir>/curves.png every epoch")
    distributed: bool = flag(False, "multi-host: call jax.distributed.initialize() first (one "
                           "process per host; SLURM, Open MPI, Cloud TPU and Kubernetes are "
                           "auto-detected, else give the next three flags)")
    coordinator: str | None = flag(None, "with --distributed: host:port of process 0 (or "
                                 "$JAX_COORDINATOR_ADDRESS)")
    num_processes: int | None = flag(None, "with --distributed: number of processes")
    process_id: int | None = flag(None, "with --distributed: this process's index")
    peer_timeout: int = flag(60, "with --distributed: seconds after which a silent process is "
                           "declared dead and the others stop with an error")

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    def use_warmup(self) -> bool:
        return self.warmup == "on" or (self.warmup == "auto" and self.arch in optim.WARMUP_ARCHS)

    def warmup_length(self, steps_per_epoch: int) -> int:
        """Warm-up iterations: 0 when off, else --warmup-epochs or --warmup-steps."""
        if not self.use_warmup():
            return 0
        return self.warmup_steps if self.warmup_epochs is None else (
            self.warmup_epochs * steps_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        """``--steps``, else ``--epochs`` x steps per epoch, else the paper's 64k iterations."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return optim.PAPER_TOTAL_STEPS

    def lr_schedule(self, steps_per_epoch: int):
        """The per-iteration optax schedule the flags describe."""
        total = self.total_steps(steps_per_epoch)
        warm = {"warmup_steps": self.warmup_length(steps_per_epoch),
                "warmup_method": self.warmup_method, "warmup_factor": self.warmup_factor}
        if self.schedule == "cosine":
            return optim.cosine_schedule(self.lr, total, **warm)
        if self.schedule == "paper":
            # 32k/48k of 64k; a compressed run keeps the same fractions.
            bounds = [b * total // optim.PAPER_TOTAL_STEPS for b in optim.PAPER_BOUNDARIES]
        else:
            epochs = math.ceil(total / steps_per_epoch)
            ms = self.milestones or [m for m in (epochs // 2, epochs * 3 // 4) if m > 0]
            bounds = optim.epoch_milestones_to_steps(ms, steps_per_epoch)
            return optim.multistep_schedule(self.lr, bounds, self.lr_gamma, **warm)
        return optim.multistep_schedule(self.lr, bounds, **warm)

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """The flags' SGD (PyTorch semantics) on their lr schedule: what the trainer steps with,
        in one place so that parity/test_training_path.py checks the very same object."""
        return optim.sgd(self.lr_schedule(steps_per_epoch), self.momentum, self.weight_decay,
                         self.nesterov, self.norm_weight_decay, self.bias_weight_decay)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**d)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag and the cause (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_flags(parser: Any, names: Iterable[str] | None = None, *, config: type | None = None,
              **defaults: Any) -> None:
    """Declares the fields ``names`` (default: all) of ``config`` (default :class:`Config`) as
    flags on an argparse parser or pytest's (``addoption``), with their help, type and choices;
    ``defaults`` overrides a field's default for this command."""
    add = getattr(parser, "add_argument", None) or parser.addoption
    config = config or Config
    hints = typing.get_type_hints(config)
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(config):
        if wanted is not None and f.name not in wanted:
            continue
        default = defaults.get(f.name, f.default)
        meta = dict(f.metadata)
        help_ = meta.pop("help") + ("" if default is None else f" (default: {default})")
        typ = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            add(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        if isinstance(typ, types.UnionType):  # X | None
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typing.get_origin(typ) is tuple:
            add(flag, nargs="+", type=typing.get_args(typ)[0], default=default, help=help_, **meta)
        else:
            add(flag, type=typ, default=default, help=help_, **meta)
