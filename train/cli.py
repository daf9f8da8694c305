"""What every trainer's command line shares: flags generated from a config dataclass (with a
named recipe's defaults), the process set-up (multi-host start, compilation cache, matmul
precision) and one line for every bad input, naming the flag or file and the cause."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jax

from flaxres import checkpoint
from flaxres.cpu import onednn
from train import data, parallel
from train.config import Config, OneLineParser, add_flags, load_recipe


def parse_config(argv: list[str] | None, *, prog: str, description: str,
                 config: type[Config] = Config) -> Config:
    """argparse generated from ``config``'s fields: one flag per field, its help and default;
    ``--recipe NAME`` turns a recipe file's settings into the defaults."""
    p = OneLineParser(prog=prog, description=description,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, config=config)
    known, _ = p.parse_known_args(argv)
    if known.recipe:
        try:
            p.set_defaults(**load_recipe(known.recipe, config))
        except ValueError as e:
            p.error(str(e))
    ns = p.parse_args(argv)
    cfg = config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()})
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


def launch(cfg: Config, action: Callable[[], object]) -> None:
    """Runs ``action`` in a process set up as ``cfg`` says: ``--distributed`` start, compilation
    cache, matmul precision; a bad input is one line and exit 2, a lost peer one line and 1."""
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
        action()
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
