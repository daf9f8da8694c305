"""``python -m train.cifar``: He et al. (2016)'s CIFAR recipe with flaxres.

    python -m train.cifar --arch resnet20 --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 1
    python -m train.cifar --recipe wrn --arch wrn16_8 --dropout 0.3 --data-dir DATA
    python -m train.cifar --workdir runs/r20 --resume
    python -m train.cifar --eval-only --checkpoint runs/r20
    python -m train.cifar --predict cat.png dog.jpg --checkpoint runs/r20

Data parallel over every device of every process (``jax.jit`` on a 1-D mesh, batch sharded on
'data', parameters replicated), so BatchNorm sees the global batch exactly as one PyTorch process
would; ``--distributed`` runs one process per host (or per accelerator).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from flaxres import checkpoint
from flaxres.cpu import onednn
from flaxres.cpu.malloc import retain_freed_memory
from train import data, inference, loop, parallel
from train.config import Config, OneLineParser, add_flags, load_recipe

# This module only parses flags and dispatches: the loop is train.loop, --eval-only and
# --predict train.inference, logs train.report, data parallelism train.parallel.

def parse_args(argv: list[str] | None = None) -> Config:
    """argparse generated from :class:`Config`: one flag per field, its help and default."""
    p = OneLineParser(prog="python -m train.cifar", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    known, _ = p.parse_known_args(argv)  # a recipe's settings become the flags' defaults
    if known.recipe:
        try:
            p.set_defaults(**load_recipe(known.recipe))
        except ValueError as e:
            p.error(str(e))
    ns = p.parse_args(argv)
    cfg = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()})
    if (cfg.eval_only or cfg.predict) and not cfg.checkpoint:
        p.error("--eval-only and --predict need --checkpoint PATH")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        p.error("--mean and --std take three numbers (R G B)")
    try:
        cfg.cpu_conv = onednn.resolve_conv(cfg.cpu_conv)
    except ValueError as e:
        p.error(str(e))
    if cfg.freeze_backbone and not cfg.init_from:
        p.error("--freeze-backbone needs --init-from PATH")
    if cfg.peer_timeout <= 0:
        p.error(f"--peer-timeout {cfg.peer_timeout}: must be a positive number of seconds")
    return cfg


def enable_compilation_cache(default_dir: str | os.PathLike | None = None) -> None:
    """Caches XLA executables on disk (in ``default_dir``, else ~/.cache/flaxres/jax): on a small
    CPU each of the ~30 compiles of model init, train and eval steps takes about a second, so
    reruns and resumes start much faster. ``JAX_COMPILATION_CACHE_DIR`` /
    ``JAX_PERSISTENT_CACHE_*`` win.

    Not in a multi-process run: with jax 0.10.2 an executable with cross-process (Gloo)
    collectives loaded from the cache deadlocks in its first collective (each process with its
    own cache folder too), so every process compiles afresh.
    """
    if jax.process_count() > 1:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          str(default_dir or data.default_cache_dir() / "jax"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(argv: list[str] | None = None) -> None:
    retain_freed_memory()  # before XLA's threads start: each step's buffers reused, not faulted in
    cfg = parse_args(argv)
    if cfg.distributed:
        try:
            parallel.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                cfg.peer_timeout)
        except (ValueError, RuntimeError) as e:  # missing settings; no coordinator in time
            print(f"error: --distributed: jax.distributed.initialize failed "
                  f"({str(e).splitlines()[0]}); give --coordinator, --num-processes and "
                  "--process-id unless the cluster is auto-detected (docs/distributed.md)",
                  file=sys.stderr)
            raise SystemExit(2) from None
    enable_compilation_cache()
    jax.config.update("jax_default_matmul_precision",
                      {"tf32": "tensorfloat32", "highest": "highest"}[cfg.matmul_precision])
    try:
        if cfg.predict:
            inference.predict(cfg)
        elif cfg.eval_only:
            inference.evaluate_checkpoint(cfg)
        else:
            loop.train(cfg)
    except (data.DataError, checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        print(parallel.lost_peer_message(e), file=sys.stderr)
        _exit(1)


def _exit(code: int) -> None:
    """Exits with ``code``. In a multi-process run, at once: jax.distributed's exit-time
    shutdown barrier would wait up to --peer-timeout for the processes that are still running
    (or dead) and then abort with a C++ stack trace; they see this one gone and stop."""
    if jax.process_count() == 1:
        raise SystemExit(code) from None
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
