"""How far whole fp32 trajectories drift from float64, beside the per-step check that the parity
suite makes instead (``Case.check_trajectory_steps``).

    python -m parity.trajectory_steps --arch resnet20

Per step: flaxres fp32's and PyTorch fp32's loss against PyTorch float64's trajectory (the
dynamics: a rounding-sized difference that one run meets and the other does not grows
step by step); then each of flaxres fp32's steps against PyTorch float64's step from the same
weights (the implementation: rounding-sized at every step).
"""

from __future__ import annotations

import argparse

from parity.cases import BY_ID
from parity.checks import Case
from parity.measure import rel_err


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m parity.trajectory_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", choices=sorted(BY_ID), metavar="ID",
                   help="a parity case id (default: resnet20)")
    args = p.parse_args(argv)
    case = Case(BY_ID[args.arch])
    mine, _ = case.flax_trajectory("fp32")
    t64, _ = case.torch_trajectory("fp64")
    t32, _ = case.torch_trajectory("fp32")
    print(f"{args.arch}: loss error of the whole fp32 trajectory against PyTorch float64's")
    for step, (a, b, ref) in enumerate(zip(mine, t32, t64)):
        print(f"step {step:2d}: flaxres fp32 {rel_err(a, ref):.2e}  PyTorch fp32 "
              f"{rel_err(b, ref):.2e}")
    print("every step, from flaxres fp32's own weights:")
    for m in case.check_trajectory_steps(steps=range(case.plan.steps)):
        print(f"  {m}")


if __name__ == "__main__":
    main()
