"""The flags of ``python -m bench.speed`` and the driver: each framework timed in a fresh
process of its own (default) or all interleaved in this one, then the results written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.speed.report import FRAMEWORKS
from bench.speed.threads import add_malloc_flag, set_malloc, set_threads
from bench.speed.timing import at_least_one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import bench.speed

    p = argparse.ArgumentParser(prog="python -m bench.speed",
                                description=bench.speed.__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet20", help="comma-separated registry names")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32, help="square input resolution")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute dtype of both frameworks (bf16: flaxres bf16 model, torch "
                        "autocast)")
    p.add_argument("--matmul-precision", choices=("highest", "tf32"), default="highest",
                   help="fp32 matmul/convolution policy, set alike in both frameworks: highest = "
                        "true fp32 (TF32 off in both), tf32 = TF32 on in both (GPUs that have "
                        "it; no effect on the CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (>= 10 for results)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after compilation")
    p.add_argument("--rounds", type=at_least_one, default=1,
                   help="isolated mode: run the frameworks' processes this many times in turn "
                        "and report each framework's median round (on a machine whose speed "
                        "drifts, the rounds pair each framework with the others' nearby runs)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"subset of {','.join(FRAMEWORKS)}")
    p.add_argument("--modes", default="train,infer", help="train, infer or both")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end input pipeline run")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "..",
                                                      "shared", "data", "cifar10-jpeg.tar.gz"),
                   help="CIFAR source for the end-to-end run (anything train.data reads)")
    p.add_argument("--e2e-images", type=int, default=0,
                   help="images of the epoch to time end to end (0 = the whole 50k epoch)")
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader workers (e2e)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--md", help="write the markdown table here too")
    p.add_argument("--plot", help="bar chart (PNG) of train/infer img/s")
    p.add_argument("--interleave", action="store_true",
                   help="time all frameworks in this one process, reps interleaved (for a loaded "
                        "machine); default: each framework in a fresh process of its own, one "
                        "after the other, so no framework's threads or caches disturb another's")
    p.add_argument("--no-fast-ops", action="store_true",
                   help="flaxres with flaxres.CpuOps.off() (lax convolutions, autodiff "
                        "BatchNorm), for before/after comparisons")
    from train.config import add_flags  # imports jax, as flaxres.cpu.onednn below does

    add_flags(p, ["cpu_conv"])
    p.add_argument("--no-onednn-batch-norm", action="store_true",
                   help="with oneDNN convolutions, BatchNorm (train mode, and eval mode's post-ops) "
                        "on XLA instead (flaxres.CpuOps.onednn_batch_norm), for before/after "
                        "comparisons")
    add_malloc_flag(p)
    args = p.parse_args(argv)
    from flaxres.cpu import onednn

    if args.no_fast_ops and args.cpu_conv == "onednn":
        p.error("--no-fast-ops times XLA's plain convolutions; it excludes --cpu-conv onednn")
    try:
        args.cpu_conv = onednn.resolve_conv("xla" if args.no_fast_ops else args.cpu_conv)
    except ValueError as e:
        p.error(str(e))
    unknown = set(_names(args.frameworks)) - set(FRAMEWORKS)
    if unknown:
        p.error(f"--frameworks: unknown {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(FRAMEWORKS)}")
    if set(_names(args.modes)) - {"train", "infer"}:
        p.error("--modes takes train, infer or train,infer")
    return args


def _cpu_ops(args: argparse.Namespace):
    """flaxres's CPU paths as the flags say: --no-fast-ops and --cpu-conv."""
    import dataclasses

    import flaxres

    base = flaxres.CpuOps.off() if args.no_fast_ops else flaxres.CpuOps()
    return dataclasses.replace(base, conv=args.cpu_conv,
                               onednn_batch_norm=not args.no_onednn_batch_norm)


def _cpu_conv(choice: str) -> str:
    """The backend with its version, for the results ("onednn 3.2.0")."""
    if choice != "onednn":
        return choice
    from flaxres.cpu import onednn

    return f"onednn {onednn.version()}"


def _names(csv: str) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    malloc = set_malloc(args.malloc)
    fws = _names(args.frameworks)
    if args.interleave or len(fws) == 1:
        results = measure(args, fws)
        results["malloc"] = malloc
    else:
        results = isolated(argv, args, fws)
    write(results, args)
    from bench.speed.report import markdown

    print()
    print(markdown(results))


def _batch(args: argparse.Namespace, seed: int):
    """A uint8 image batch and its labels, the same for every framework and process."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s = args.input_size
    return (rng.integers(0, 256, (args.batch_size, s, s, 3), dtype=np.uint8),
            rng.integers(0, args.num_classes, args.batch_size).astype(np.int32))


def measure(args: argparse.Namespace, fws: list[str]) -> dict:
    """Every framework in this process, reps interleaved so load changes hit all alike; the
    JSON is rewritten after each architecture, so a long run keeps what it measured."""
    set_threads(args.threads)
    import numpy as np
    import torch

    from bench.speed import jax_runner, precision, report, timing, torch_runner
    from train.config import CIFAR_MEAN, CIFAR_STD

    torch.set_num_threads(args.threads)
    modes = _names(args.modes)
    with precision.policy(args.matmul_precision) as policy:
        dev = torch_runner.device()
        results = {"args": vars(args), "machine": report.machine(), "archs": {},
                   "precision_policy": policy, "torch_device": dev,
                   "flaxres_ops": "off (lax + autodiff BatchNorm)" if args.no_fast_ops else "on",
                   "cpu_conv": _cpu_conv(args.cpu_conv)
                   + (" (BatchNorm on XLA)" if args.no_onednn_batch_norm else ""),
                   "timing": "all frameworks in one process, reps interleaved"}
        print(f"# {results['machine']['cpu']}, threads={args.threads}, load "
              f"{results['machine']['loadavg_start']}", flush=True)
        results["peak"] = timing.peak_flops(args.precision, dev)
        print(f"peak {results['peak']['peak_flop_s'] / 1e9:.1f} GFLOP/s", flush=True)
        for i, arch in enumerate(_names(args.arch)):
            images, labels = _batch(args, seed=i)
            jb = jax_runner.build(arch, images, labels, num_classes=args.num_classes,
                                  precision=args.precision, cpu_ops=_cpu_ops(args),
                                  mean=CIFAR_MEAN, std=CIFAR_STD)
            base = torch_runner.reference_with_weights_of(arch, jb.model, args.num_classes)
            x = jax_runner.normalized(images, CIFAR_MEAN, CIFAR_STD)
            tb = {v: torch_runner.build(base, v, x, labels, precision=args.precision, dev=dev)
                  for v in fws if v in torch_runner.VARIANTS}
            r = {"flops_per_image": jb.flops_per_image, "weights": "flaxres.convert.to_torch",
                 "frameworks": {}}
            if "torch-eager" in tb:  # before any step changes the weights
                ref, got = tb["torch-eager"].logits(), jb.logits()
                r["logits_rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            for mode in modes:
                runners = {fw: getattr(jb if fw == "flaxres-jit" else tb[fw], mode)
                           for fw in fws}
                for fw, t in timing.interleave(runners, args.reps, args.warmup).items():
                    v = r["frameworks"].setdefault(fw, {})[mode] = t.summary(args.batch_size)
                    print(f"{arch:>14s} {mode:5s} {fw:20s} {v['img_s']:8.1f} img/s "
                          f"[{v['img_s_range'][0]:.0f}..{v['img_s_range'][1]:.0f}] "
                          f"compile {v['compile_s']:.1f}s", flush=True)
            if not args.skip_e2e:
                r["e2e"] = _e2e(args, jb, base if "torch-eager" in fws else None)
                print(f"{arch:>14s} e2e {json.dumps(r['e2e'])}", flush=True)
            results["archs"][arch] = r
            write(results, args)
    return results


def _e2e(args: argparse.Namespace, jb, torch_module) -> dict:
    from bench.speed import e2e

    return e2e.run(jb, torch_module, data_dir=args.data_dir, batch=args.batch_size,
                   images_to_time=args.e2e_images, workers=args.workers)


def isolated(argv: list[str], args: argparse.Namespace, fws: list[str]) -> dict:
    """Each framework timed by a fresh ``python -m bench.speed`` process of its own, in turn;
    the results merged; then the end-to-end run (itself one framework at a time) here."""
    results, rounds = None, []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            rounds.append({})
            for fw in fws:
                out = os.path.join(d, f"{fw}-{i}.json")
                cmd = [sys.executable, "-m", "bench.speed", *argv, "--frameworks", fw,
                       "--skip-e2e", "--rounds", "1", "--json", out, "--md", "", "--plot", ""]
                # A torch process uses JAX only to build the weights: without preallocation JAX
                # leaves the GPU's memory to torch (it takes 75% at first use otherwise).
                env = dict(os.environ, **({} if fw == "flaxres-jit"
                                          else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}))
                subprocess.run(cmd, check=True, env=env)
                with open(out) as f:
                    sub = json.load(f)
                for arch, r in sub["archs"].items():
                    rounds[i].setdefault(arch, {}).update(r["frameworks"])
                if results is None:
                    results = sub
                    continue
                for arch, r in sub["archs"].items():
                    mine = results["archs"][arch]
                    mine.update({k: v for k, v in r.items() if k not in mine})
                if sub["peak"]["peak_flop_s"] > results["peak"]["peak_flop_s"]:
                    results["peak"] = sub["peak"]
    for arch, r in results["archs"].items():
        r["frameworks"] = median_round([rnd[arch] for rnd in rounds])
        if args.rounds > 1:
            r["rounds"] = [rnd[arch] for rnd in rounds]
    results["args"] = vars(args)
    results["timing"] = ("each framework in its own process, one after the other"
                         + (f", {args.rounds} rounds, median round" if args.rounds > 1 else ""))
    if not args.skip_e2e:
        set_threads(args.threads)
        import torch

        from bench.speed import jax_runner, precision, torch_runner
        from train.config import CIFAR_MEAN, CIFAR_STD

        torch.set_num_threads(args.threads)
        with precision.policy(args.matmul_precision):
            for i, arch in enumerate(results["archs"]):
                images, labels = _batch(args, seed=i)
                jb = jax_runner.build(arch, images, labels, num_classes=args.num_classes,
                                      precision=args.precision, cpu_ops=_cpu_ops(args),
                                      mean=CIFAR_MEAN, std=CIFAR_STD)
                base = torch_runner.reference_with_weights_of(arch, jb.model, args.num_classes)
                results["archs"][arch]["e2e"] = _e2e(args, jb, base)
    return results


def median_round(rounds: list[dict]) -> dict:
    """Per framework and mode, the round with the median img/s (its own reps' range and compile
    time kept); the range widened to the slowest and fastest round's."""
    import statistics

    merged = {}
    for fw in rounds[0]:
        for mode in rounds[0][fw]:
            runs = sorted((rnd[fw][mode] for rnd in rounds), key=lambda s: s["img_s"])
            mid = dict(runs[(len(runs) - 1) // 2])
            mid["img_s"] = statistics.median(s["img_s"] for s in runs)
            mid["img_s_range"] = [min(s["img_s_range"][0] for s in runs),
                                  max(s["img_s_range"][1] for s in runs)]
            merged.setdefault(fw, {})[mode] = mid
    return merged


def write(results: dict, args: argparse.Namespace) -> None:
    """JSON, markdown and plot, each where its flag says (an empty path writes nothing)."""
    from bench.speed.report import markdown, plot

    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.plot:
        plot(results, args.plot)
