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

from flaxres.cpu.malloc import retain_freed_memory
from train import cli, inference, loop
from train.config import Config

# This module only parses flags and dispatches: the loop is train.loop, --eval-only and
# --predict train.inference, logs train.report, data parallelism train.parallel, the process
# set-up every trainer shares train.cli.

def parse_args(argv: list[str] | None = None) -> Config:
    """The flags of :class:`Config`, with a recipe's defaults."""
    return cli.parse_config(argv, prog="python -m train.cifar", description=__doc__)


def main(argv: list[str] | None = None) -> None:
    retain_freed_memory()  # before XLA's threads start: each step's buffers reused, not faulted in
    cfg = parse_args(argv)

    def action():
        if cfg.predict:
            inference.predict(cfg)
        elif cfg.eval_only:
            inference.evaluate_checkpoint(cfg)
        else:
            loop.train(cfg)

    cli.launch(cfg, action)


if __name__ == "__main__":
    main()
