"""Where an fp32 trajectory leaves float64, step by step: a diagnostic for an fp32 trajectory
check that fails without being chaotic.

    python -m parity.trajectory_steps --arch resnet20 --steps 10

Per step: flaxres fp32's and PyTorch fp32's loss against PyTorch float64's trajectory, and
flaxres fp32's gradient at the weights its own trajectory reached, against PyTorch float64's
gradient at those same weights (``Case.check_grads``). A wrong step shows in the gradient
column; accurate gradients under a growing loss error mean the dynamics amplify rounding.
"""

from __future__ import annotations

import argparse

from flaxres.convert import to_torch
from parity.cases import BY_ID
from parity.checks import Case
from parity.measure import Measure, rel_err


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m parity.trajectory_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", choices=sorted(BY_ID), metavar="ID",
                   help="a parity case id (default: resnet20)")
    p.add_argument("--steps", type=int, default=10,
                   help="check the gradient at the first N steps (default: 10)")
    args = p.parse_args(argv)
    case = Case(BY_ID[args.arch])
    grads: list[Measure] = []

    def check_gradient(step: int, model) -> None:
        if step < args.steps:
            probe = Case(case.arch)
            probe.torch_model.load_state_dict(to_torch(model))
            probe.batches[0] = case.batches[step]
            grads.append(probe.check_grads("fp32"))

    losses, _ = case.flax_trajectory("fp32", check_gradient)
    t64, _ = case.torch_trajectory("fp64")
    t32, _ = case.torch_trajectory("fp32")
    print(f"{args.arch}: loss error against PyTorch float64 | flaxres fp32 gradient at its own "
          "weights")
    for step, (mine, theirs, ref) in enumerate(zip(losses, t32, t64)):
        g = f"{grads[step]}" if step < len(grads) else ""
        print(f"step {step:2d}: flaxres fp32 {rel_err(mine, ref):.2e}  PyTorch fp32 "
              f"{rel_err(theirs, ref):.2e} | {g}")


if __name__ == "__main__":
    main()
