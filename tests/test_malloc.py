"""flaxres.cpu.malloc: XLA:CPU's per-call buffers are reused instead of page-faulted in anew."""

import subprocess
import sys

import pytest

# A jitted function whose temporary buffers (two 96 MB cumulative sums) exceed what glibc's
# adaptive mmap threshold and a thread's arena hold; minor page faults per call, after warm-up.
_PROBE = """
import resource, sys
if sys.argv[1] == "retain":
    from flaxres.cpu.malloc import retain_freed_memory
    assert retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((6000, 4000), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(x, axis=0)[-1] + jnp.cumsum(x, axis=1)[:, -1].sum())
for _ in range(5):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    buffer_pages = 96e6 / 4096
    assert _faults_per_call("glibc") > buffer_pages  # the premise: each call faults its buffer in
    assert _faults_per_call("retain") < 0.01 * buffer_pages
