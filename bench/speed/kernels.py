"""oneDNN's own time for each convolution of a whole inference batch, flaxres against
torch.compile, read from oneDNN's verbose log: whether an inference gap in ``bench.speed`` sits in
the kernels or around them.

    python -m bench.speed.kernels [--arch resnet20] [--rounds 2] [--batch 128] [--reps 20]

Both frameworks call oneDNN for their CPU convolutions (flaxres its own build through
``jax.ffi``, PyTorch the one linked into it), and both print a line per primitive execution under
``ONEDNN_VERBOSE=1``: implementation, shape, milliseconds. Each (framework, round) runs in a fresh
process, the frameworks alternating; the lines of the ``--reps`` timed batches (after warm-up)
are summed per convolution shape. The logging slows both a little: the wall time printed beside
is with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict

from bench.speed.timing import add_worker_flags, alternate_workers

FRAMEWORKS = ("flaxres", "torch-compile")
MARK = "flaxres-kernels: timed batches follow"
_SHAPE = re.compile(r"mb\d+_ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+)sh(\d+)")


def parse_line(line: str) -> tuple[str, float] | None:
    """(what, ms) of one oneDNN verbose execution line, None for other lines.
    ``what`` is "conv 32x32 16->16 k3 s1" for a convolution, else the primitive kind. Both
    oneDNN 3.2's and 3.12's formats (the latter inserts "v1,primitive" before "exec")."""
    fields = line.strip().split(",")
    if fields[0] != "onednn_verbose" or "exec" not in fields:
        return None
    i = fields.index("exec")
    kind = fields[i + 2]
    shape = _SHAPE.match(fields[-2])
    if kind == "convolution" and shape:
        ic, oc, hw, k, s = shape.groups()
        kind = f"conv {hw}x{hw} {ic}->{oc} k{k} s{s}"
    return kind, float(fields[-1])


def run_worker(framework: str, arch: str, batch: int, reps: int) -> None:
    """Warms one framework's jitted/compiled inference up, prints MARK, runs ``reps`` timed
    batches (oneDNN logs each primitive), then a JSON line with the wall ms per batch."""
    import numpy as np

    import flaxres

    jmodel = flaxres.create_model(arch, num_classes=10)
    x = np.random.default_rng(0).standard_normal((batch, 32, 32, 3)).astype(np.float32)
    if framework == "flaxres":
        import jax
        from flax import nnx

        from flaxres.cpu import onednn

        if reason := onednn.unavailable_reason():
            raise SystemExit(f"flaxres has no oneDNN convolutions to log ({reason})")

        jmodel.eval()
        graph, state = nnx.split(jmodel)
        predict = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graph, s)(x)))

        def run() -> None:
            predict(state, x).block_until_ready()
    else:
        import torch

        from bench.speed.torch_runner import reference_with_weights_of

        compiled = torch.compile(reference_with_weights_of(arch, jmodel, 10).eval())
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def run() -> None:
            with torch.no_grad():
                compiled(xt).softmax(-1)  # as bench.speed's torch-compile infer
    for _ in range(5):
        run()
    print(MARK, flush=True)
    start = time.perf_counter()
    for _ in range(reps):
        run()
    print(json.dumps({"wall_ms": (time.perf_counter() - start) / reps * 1e3}), flush=True)


def summarize(stdout: str, reps: int) -> dict[str, float]:
    """ms per batch of each convolution shape and of every other oneDNN primitive, the totals,
    and the wall time, from one worker's output."""
    timed = stdout.split(MARK, 1)[1].splitlines()
    ms: dict[str, float] = defaultdict(float)
    for line in timed:
        parsed = parse_line(line)
        if parsed:
            what, t = parsed
            if what.startswith("conv "):
                ms[what] += t / reps
                ms["convolutions"] += t / reps
            else:
                ms["other oneDNN primitives"] += t / reps
    ms["wall (with the logging)"] = json.loads(timed[-1])["wall_ms"]
    return dict(ms)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speed.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", help="a CIFAR model (default: resnet20)")
    add_worker_flags(p, rounds=2, reps=20, reps_help="timed batches per process")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one framework in this fresh process
        from bench.speed.threads import set_threads

        set_threads(args.threads)
        run_worker(args.worker, args.arch, args.batch, args.reps)
        return
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    workers = alternate_workers(
        "bench.speed.kernels", FRAMEWORKS, args.rounds,
        ["--arch", args.arch, "--threads", str(args.threads), "--batch", str(args.batch),
         "--reps", str(args.reps)],
        env={**os.environ, "ONEDNN_VERBOSE": "1"})
    for fw, stdout in workers:
        if MARK not in stdout:
            raise SystemExit(f"error: the {fw} worker failed: it timed no batch")
        for key, ms in summarize(stdout, args.reps).items():
            rows[key][fw].append(ms)
    print(f"{args.arch} inference, batch {args.batch}, {args.threads} threads: oneDNN's own ms "
          f"per batch (summed over its calls), one value per round")
    width = max(16, 8 * args.rounds + 2)
    print(f"  {'':<30}" + "".join(f"{fw:>{width}}" for fw in FRAMEWORKS))
    totals = ("convolutions", "other oneDNN primitives", "wall (with the logging)")
    for key in sorted(k for k in rows if k not in totals) + list(totals):
        cells = ("".join(f"{m:8.1f}" for m in rows[key][fw]) or "-" for fw in FRAMEWORKS)
        print(f"  {key:<30}" + "".join(f"{c:>{width}}" for c in cells))


if __name__ == "__main__":
    main()
