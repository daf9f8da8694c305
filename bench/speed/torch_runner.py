"""The PyTorch side: the reference model with flaxres' initial weights, as eager, channels_last
and ``torch.compile`` variants, each with its own ``torch.optim.SGD``, on the same kind of device
as JAX (a CUDA GPU when JAX runs on one, else the CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bench.speed.jax_runner import LR, MOMENTUM, WEIGHT_DECAY
from flaxres.convert import to_torch
from parity.reference import create_torch_model

VARIANTS = ("torch-eager", "torch-channels_last", "torch-compile")


@dataclass
class TorchRunner:
    """One variant: synchronous ``train`` / ``infer`` calls to time."""

    train: Callable[[], None]
    infer: Callable[[], None]
    logits: Callable[[], np.ndarray]  # eval-mode logits of the batch, initial weights
    module: torch.nn.Module


def device() -> str:
    """``"cuda"`` when JAX computes on a GPU and torch sees one, else ``"cpu"``: both frameworks
    are timed on the same kind of device."""
    import jax

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def sync(dev: str) -> None:
    """Waits for queued GPU work, so a timed call ends when its result exists (CPU torch is
    synchronous)."""
    if dev == "cuda":
        torch.cuda.synchronize()


def reference_with_weights_of(arch: str, jmodel, num_classes: int) -> torch.nn.Module:
    """The PyTorch reference of ``arch`` holding ``jmodel``'s weights (strict state-dict load)."""
    torch.manual_seed(0)
    model = create_torch_model(arch, num_classes=num_classes)
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in to_torch(jmodel).items()}
    model.load_state_dict(state, strict=True)
    return model


def build(base: torch.nn.Module, variant: str, x_nhwc: np.ndarray, labels: np.ndarray, *,
          precision: str, dev: str = "cpu") -> TorchRunner:
    """``variant`` of a copy of ``base`` on device ``dev``, on the float batch ``x_nhwc``
    (already normalised)."""
    m = copy.deepcopy(base).to(dev)
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dev)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    if variant == "torch-channels_last":
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    fwd = torch.compile(m) if variant == "torch-compile" else m
    bf16 = precision == "bf16"

    def train() -> None:
        m.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        sync(dev)

    def infer() -> None:
        m.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            fwd(x).softmax(-1)  # as steps.predict_probs
        sync(dev)

    def logits() -> np.ndarray:
        m.eval()
        with torch.no_grad():
            return fwd(x).double().cpu().numpy()

    return TorchRunner(train=train, infer=infer, logits=logits, module=m)
