"""Builds flaxres's optional C++ extension: oneDNN convolutions and batch norm as XLA FFI handlers
(CPU).

Metadata lives in pyproject.toml. The extension is optional: when oneDNN's headers, the FFI
headers or a compiler are missing, or the build fails, the install goes on with a warning and
flaxres uses XLA's convolutions (flaxres.cpu.onednn says so once at run time).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ONEDNN_LIBRARY = "libdnnl.so.3"


def _installed_file(distribution: str, suffix: str) -> Path | None:
    """Where a wheel put one of its files (oneDNN's wheels install into <prefix>/include and
    <prefix>/lib, outside site-packages, so look them up in the wheel's RECORD)."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(metadata.distribution(distribution).locate_file(f)).resolve()
    return None


class OptionalBuildExt(build_ext):
    """build_ext that finds oneDNN and the FFI headers, and turns any failure into a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            header = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
            library = _installed_file("onednn-cpu-gomp", ONEDNN_LIBRARY)
            if header is None or library is None:
                raise RuntimeError("oneDNN not found (pip packages onednn-devel-cpu-gomp and "
                                   "onednn-cpu-gomp, Linux x86-64 only)")
            import jax.ffi

            # -isystem: the FFI headers' own warnings are not ours to fix.
            for include in (str(header.parents[2]), jax.ffi.include_dir()):
                ext.extra_compile_args += ["-isystem", include]
            ext.library_dirs += [str(library.parent)]
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any failure leaves XLA's convolutions
            print(f"WARNING: flaxres: oneDNN convolution extension not built ({err}); flaxres "
                  "will use XLA's convolutions on the CPU", file=sys.stderr)


setup(
    ext_modules=[Extension(
        "flaxres.cpu._onednn",
        sources=["flaxres/csrc/onednn_conv.cc", "flaxres/csrc/onednn_bn.cc"],
        depends=["flaxres/csrc/onednn_common.h"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-g0", "-fvisibility=hidden"],
        extra_link_args=[f"-l:{ONEDNN_LIBRARY}", "-lgomp", "-Wl,--no-undefined"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
