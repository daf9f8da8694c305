"""CPU inference, four ways side by side: flaxres jitted (oneDNN), onnxruntime running flaxres's
ONNX export, onnxruntime running PyTorch's own ONNX export, and PyTorch (eager, channels_last,
torch.compile; the fastest is the column), all with the same weights.

flaxres's column is its serving setup (docs/deploy.md): the model closed over by ``jax.jit`` with
``CpuOps(pack_weights=True)`` (oneDNN's weight layout made once, at trace time) and JAX's
synchronous CPU dispatch (``jax_cpu_enable_async_dispatch=False``: the call runs on the calling
thread, as PyTorch's and onnxruntime's do, so oneDNN's OpenMP team is that one thread's). The
"flaxres defaults" column is the same jitted model with neither setting, for comparison.

    python -m bench.speed.infer --arch resnet20,resnet50 [--rounds 2] [--threads 2] \\
        [--latency-reps 100] [--reps 10] [--json infer.json] [--md infer.md]

Batch 1 is latency: ``--latency-reps`` single-image calls after warm-up, median and 90th
percentile. Batch ``--batch`` (default 64) is throughput: img/s at the median of ``--reps``
calls. Every call takes a float32 numpy batch, already normalised, and returns the logits as a
host array, as a server would: the host-to-device copy and the dispatch are part of the time.
Each column runs in a fresh process per round, the columns alternating (no two frameworks' thread
pools share a process, and drift in the machine's speed falls on all alike); each number is the
median over the rounds. The two ONNX files are exported once, before the rounds, by
``flaxres.export.to_onnx`` and by ``torch.onnx.export`` (TorchScript exporter, which folds
BatchNorm into the convolutions); onnxruntime runs them with all graph optimisations.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.speed.threads import set_threads
from bench.speed.timing import add_worker_flags, alternate_workers, at_least_one
from train.config import OneLineParser

COLUMNS = ("flaxres", "flaxres-defaults", "ort-flaxres", "ort-torch", "torch-eager",
           "torch-channels_last", "torch-compile")
TORCH = COLUMNS[4:]


def _model(arch: str, serving: bool = False):
    """The flaxres model (eval mode, oneDNN on the CPU; packing its weights if ``serving``) and
    its input size."""
    import flaxres

    model = flaxres.create_model(arch, cpu_ops=flaxres.CpuOps(pack_weights=serving))
    model.eval()
    return model, flaxres.default_cfg(arch).input_size


def export_onnx(arch: str, folder: Path) -> dict[str, str]:
    """Both ONNX files of ``arch`` with the same (initial) weights."""
    import torch

    from bench.speed.torch_runner import reference_with_weights_of
    from flaxres import export

    model, size = _model(arch)
    ours = folder / f"{arch}.flaxres.onnx"
    ours.write_bytes(export.to_onnx(export.load(arch), image_size=size,
                                    name=arch).SerializeToString())
    ref = reference_with_weights_of(arch, model, model.fc.kernel.shape[-1]).eval()
    buf = io.BytesIO()
    torch.onnx.export(ref, (torch.zeros(1, 3, size, size),), buf, dynamo=False,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}})
    theirs = folder / f"{arch}.torch.onnx"
    theirs.write_bytes(buf.getvalue())
    return {"ort-flaxres": str(ours), "ort-torch": str(theirs)}


def _predictor(column: str, arch: str, onnx: dict[str, str], threads: int):
    """A function from an NHWC float32 numpy batch to numpy logits."""
    import numpy as np

    if column.startswith("flaxres"):
        import jax

        serving = column == "flaxres"
        jax.config.update("jax_cpu_enable_async_dispatch", not serving)
        model, _ = _model(arch, serving)
        fn = jax.jit(model)
        return lambda x: np.asarray(fn(x))
    if column.startswith("ort-"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx[column], opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        nchw = column == "ort-torch"
        return lambda x: session.run(None, {name: x.transpose(0, 3, 1, 2).copy() if nchw
                                            else x})[0]
    import torch

    from bench.speed.torch_runner import reference_with_weights_of

    torch.set_num_threads(threads)
    model, _ = _model(arch)
    m = reference_with_weights_of(arch, model, model.fc.kernel.shape[-1]).eval()
    if column == "torch-channels_last":
        m = m.to(memory_format=torch.channels_last)
    fwd = torch.compile(m) if column == "torch-compile" else m

    def predict(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC memory: channels_last as it comes
        t = t if column == "torch-channels_last" else t.contiguous()
        with torch.inference_mode():
            return fwd(t).numpy()

    return predict


def worker(args: argparse.Namespace) -> None:
    """Times one column on both batch sizes; prints JSON."""
    import numpy as np

    from bench.speed.threads import set_malloc

    set_malloc("retain")  # as bench.speed: the same allocator settings in every column
    predict = _predictor(args.worker, args.arch, json.loads(args.onnx), args.threads)
    size = args.image_size
    out = {}
    for batch, reps in ((1, args.latency_reps), (args.batch, args.reps)):
        x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
        t0 = time.perf_counter()
        predict(x)
        first = time.perf_counter() - t0
        for _ in range(max(2, reps // 10)):
            predict(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            predict(x)
            times.append(time.perf_counter() - t0)
        out[str(batch)] = {"first_s": first, "times_s": times}
    print(json.dumps(out))


def summarize(times_s: list[float], batch: int) -> dict:
    t = sorted(times_s)
    p90 = t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]
    return {"median_ms": statistics.median(t) * 1e3, "p90_ms": p90 * 1e3,
            "img_s": batch / statistics.median(t)}


def run(args: argparse.Namespace) -> dict:
    from bench.speed.report import machine

    results: dict = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds,
                     "latency_reps": args.latency_reps, "reps": args.reps, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            onnx = export_onnx(arch, Path(tmp))
            size = _model(arch)[1]
            rounds: dict[str, list[dict]] = {c: [] for c in args.columns}
            for column, stdout in alternate_workers(
                    "bench.speed.infer", args.columns, args.rounds,
                    ["--arch", arch, "--onnx", json.dumps(onnx), "--threads", str(args.threads),
                     "--batch", str(args.batch), "--reps", str(args.reps), "--latency-reps",
                     str(args.latency_reps), "--image-size", str(size)]):
                rounds[column].append(json.loads(stdout.strip().splitlines()[-1]))
            per = {}
            for column, rs in rounds.items():
                per[column] = {}
                for b in ("1", str(args.batch)):
                    each = [summarize(r[b]["times_s"], int(b)) for r in rs]
                    per[column][b] = {k: statistics.median(e[k] for e in each) for k in each[0]}
            results["archs"][arch] = per
            print(table(arch, per, args.batch), flush=True)
    results["machine"] = machine()
    return results


NAMES = {"flaxres": "flaxres jit", "flaxres-defaults": "flaxres jit, defaults",
         "ort-flaxres": "ORT, flaxres ONNX", "ort-torch": "ORT, PyTorch ONNX"}


def table(arch: str, per: dict, batch: int) -> str:
    """One markdown block per net: the columns measured (PyTorch's fastest variant as one) and
    the two ratios the goals name, where both sides were measured."""
    torch = [c for c in TORCH if c in per]
    fastest = {b: min(torch, key=lambda c: per[c][b]["median_ms"]) for b in ("1", str(batch))
               } if torch else {}
    shown = [c for c in NAMES if c in per]
    ratios = [(name, a, c) for name, a, c in (("flaxres / PyTorch", "flaxres", "torch"),
                                              ("ORT flaxres / ORT PyTorch", "ort-flaxres",
                                               "ort-torch"))
              if a in per and (c in per or (c == "torch" and torch))]
    head = [NAMES[c] for c in shown] + (["fastest PyTorch"] if torch else []) + [r[0] for r in
                                                                                ratios]
    rows = [f"**{arch}**", "", "| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for b, what in (("1", "median ms"), ("1", "p90 ms"), (str(batch), "img/s")):
        key = {"median ms": "median_ms", "p90 ms": "p90_ms", "img/s": "img_s"}[what]
        value = {c: per[c][b][key] for c in [*shown, *torch]}
        value["torch"] = value[fastest[b]] if torch else None
        cells = [f"{value[c]:.2f}" if value[c] < 100 else f"{value[c]:.0f}" for c in shown]
        if torch:
            cells.append(f"{value['torch']:.2f}" if value["torch"] < 100 else
                         f"{value['torch']:.0f}")
            cells[-1] += f" ({fastest[b].removeprefix('torch-')})"
        # Speed ratios: above 1 means the first is faster.
        for _, x, y in ratios:
            cells.append(f"{value[x] / value[y] if key == 'img_s' else value[y] / value[x]:.2f}x")
        rows.append(f"| batch {b}, {what} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def columns(text: str) -> list[str]:
    chosen = [c for c in text.split(",") if c]
    unknown = [c for c in chosen if c not in COLUMNS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or 'none'}: not among "
                                         f"{', '.join(COLUMNS)}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m bench.speed.infer", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20,resnet50", help="comma-separated")
    p.add_argument("--columns", type=columns, default=",".join(COLUMNS),
                   help=f"comma-separated, of {', '.join(COLUMNS)} (default: all)")
    add_worker_flags(p, rounds=2, reps=10, reps_help="timed throughput calls per process",
                     batch=64)
    p.add_argument("--latency-reps", type=at_least_one, default=100,
                   help="timed batch-1 calls per process (default: 100)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the tables here")
    p.add_argument("--worker", choices=COLUMNS, help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)  # before jax or torch is imported
    if args.worker:
        worker(args)
        return
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        Path(args.md).write_text("\n\n".join(table(a, per, args.batch)
                                             for a, per in results["archs"].items()) + "\n")


if __name__ == "__main__":
    sys.exit(main())
