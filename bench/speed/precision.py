"""The matmul/convolution precision policy of a comparison, set explicitly and alike in both
frameworks, and recorded with the results.

The two frameworks' defaults differ on a GPU: JAX's default precision lets XLA use TF32 for
fp32 matmuls and convolutions, PyTorch uses TF32 for cuDNN convolutions but not for cuBLAS
matmuls. So both are set:

* ``highest``: true fp32 products, TF32 off in both: ``jax_default_matmul_precision="highest"``;
  ``torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision =
  "ieee"``.
* ``tf32``: TF32 on in both where the GPU has it (Ampere and later):
  ``jax_default_matmul_precision="tensorfloat32"``; both torch settings ``"tf32"``.

On the CPU the policy changes nothing: XLA:CPU computes fp32 at every precision, and PyTorch's
oneDNN (``torch.backends.mkldnn``) is held at ``"ieee"`` under both policies. bf16 compute is the
separate ``--precision bf16``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import torch

POLICIES = {"highest": ("highest", "ieee"), "tf32": ("tensorfloat32", "tf32")}
# The torch settings a policy sets, as (backend, operation) of torch.backends.
_TORCH_GPU = (("cuda", "matmul"), ("cudnn", "conv"))
_TORCH_CPU = (("mkldnn", "matmul"), ("mkldnn", "conv"))


def _torch_setting(backend: str, op: str):
    return getattr(getattr(torch.backends, backend), op)


def describe() -> dict[str, str]:
    """The settings in force, as the results record them."""
    out = {"jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
    for backend, op in _TORCH_GPU + _TORCH_CPU:
        out[f"torch.backends.{backend}.{op}.fp32_precision"] = \
            _torch_setting(backend, op).fp32_precision
    return out


@contextlib.contextmanager
def policy(name: str) -> Iterator[dict[str, str]]:
    """Runs the block under policy ``name`` (a key of :data:`POLICIES`) in both frameworks and
    yields :func:`describe` with ``policy`` added; the previous settings come back after it.

    PyTorch (>= 2.9) forbids mixing its legacy ``allow_tf32`` flags with ``fp32_precision``;
    this uses only the latter.
    """
    jax_value, torch_value = POLICIES[name]
    settings = [(b, o, torch_value) for b, o in _TORCH_GPU] + [(b, o, "ieee")
                                                                for b, o in _TORCH_CPU]
    saved = [(b, o, _torch_setting(b, o).fp32_precision) for b, o, _ in settings]
    try:
        for backend, op, value in settings:
            _torch_setting(backend, op).fp32_precision = value
        with jax.default_matmul_precision(jax_value):
            yield {"policy": name, **describe()}
    finally:
        for backend, op, value in saved:
            _torch_setting(backend, op).fp32_precision = value
