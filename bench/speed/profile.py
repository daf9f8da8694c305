"""Where the milliseconds of a train step and of an inference batch go, in flaxres and in
PyTorch, on the batch and weights ``python -m bench.speed`` times:

    python -m bench.speed.profile --arch resnet20 --cpu-conv onednn [--reps 5] [--threads 2]

flaxres: a ``jax.profiler`` trace of the trainer's jitted step. XLA:CPU records each thunk it runs
under its HLO instruction's name; the compiled program says what that instruction is
(convolution, oneDNN call, matmul, fusion with or without a reduction, data movement) and whether
it belongs to the backward pass (JAX names those ops ``transpose(jvp(...))``). PyTorch:
``torch.profiler``'s self CPU time per aten operator. Times are per step, summed over threads
(concurrent work adds up), beside the wall time of a step. Each framework runs after the other
in this process; for speed itself use ``python -m bench.speed``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

from bench.speed.threads import add_malloc_flag, set_malloc, set_threads

# name = type op(operands...; a type is one shape or a tuple of shapes (a multi-output custom call)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^()]*\)|\S+) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")
DATA_MOVEMENT = {"copy", "transpose", "pad", "slice", "concatenate", "dynamic-slice",
                 "dynamic-update-slice", "gather", "scatter", "bitcast", "reshape", "broadcast"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed.profile",
                                description=__doc__.split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5, help="profiled steps (after warm-up)")
    from train.config import add_flags  # imports jax, as flaxres.cpu.onednn below does

    add_flags(p, ["cpu_conv"])
    p.add_argument("--torch", default="torch-channels_last",
                   help="comma-separated PyTorch variants to profile (bench.speed's names)")
    p.add_argument("--top", type=int, default=12, help="rows per table")
    p.add_argument("--json", help="write the profile here too")
    add_malloc_flag(p)
    args = p.parse_args(argv)
    from flaxres.cpu import onednn  # imports jax: the threads are set when main() starts

    try:
        args.cpu_conv = onednn.resolve_conv(args.cpu_conv)
    except ValueError as e:
        p.error(str(e))
    return args


def classify_hlo(text: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of the entry and the nested
    computations a thunk may run (XLA:CPU names a thunk after its instruction)."""
    reduces, kinds, called = set(), {}, {}
    computation = ""
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m.group(1)
        elif m := _INSTRUCTION.match(line):
            name, op, rest = m.groups()
            if op in ("reduce", "reduce-window"):
                reduces.add(computation)
            backward = "transpose(" in rest
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                kind = f"custom-call {target.group(1) if target else '?'}"
            elif op == "fusion":
                fused = re.search(r"calls=%?([\w.\-]+)", rest)
                called[name] = fused.group(1) if fused else ""
                kind = "fusion"
            elif op in DATA_MOVEMENT:
                kind = "data movement"
            else:
                kind = op
            kinds[name] = f"{kind}{' (backward)' if backward else ''}"
    for name, fused in called.items():
        if fused in reduces:
            kinds[name] = kinds[name].replace("fusion", "fusion with a reduction", 1)
        else:
            kinds[name] = kinds[name].replace("fusion", "elementwise fusion", 1)
    return kinds


def _thunk_times(trace_dir: str, module: str) -> list[tuple[str, float]]:
    """(HLO instruction, microseconds) of every thunk of HLO module ``module`` in a
    jax.profiler trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["args"]["hlo_op"], e.get("dur", 0.0)) for e in events
            if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module
            and "hlo_op" in e["args"]]


def _faults_and_system_time(run, reps: int) -> dict:
    """Minor page faults and kernel (system) seconds per call of ``run``: what a malloc that
    hands each call fresh pages costs (flaxres.cpu.malloc)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(reps):
        run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": (after.ru_minflt - before.ru_minflt) / reps,
            "system_s": (after.ru_stime - before.ru_stime) / reps}


def profile_flaxres(run, hlo_text: str, reps: int) -> dict:
    """Per kind of instruction: ms per call of ``run`` (a synchronous step), the wall, and the
    page faults and system time per call (untraced)."""
    import jax

    kinds = classify_hlo(hlo_text)
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)
    run()
    per_call = _faults_and_system_time(run, reps)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            wall = (time.perf_counter() - t0) / reps
        thunks = _thunk_times(d, module)
    by_kind = collections.Counter()
    for op, us in thunks:
        by_kind[kinds.get(op, "other")] += us / 1e3 / reps
    return {"wall_ms": wall * 1e3, "ms": dict(by_kind.most_common()), **per_call}


def profile_torch(run, reps: int) -> dict:
    """Per aten operator: self CPU ms per call of ``run``, and the wall."""
    import torch

    run()
    per_call = _faults_and_system_time(run, reps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        wall = (time.perf_counter() - t0) / reps
    ops = collections.Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] += e.self_cpu_time_total / 1e3 / reps
    return {"wall_ms": wall * 1e3, "ms": dict(ops.most_common()), **per_call}


def table(title: str, prof: dict, top: int) -> str:
    rows = list(prof["ms"].items())
    shown, rest = rows[:top], sum(v for _, v in rows[top:])
    head = (f"\n{title}: {prof['wall_ms']:.1f} ms wall per call, "
            f"{sum(prof['ms'].values()):.1f} ms summed over threads; per call "
            f"{prof['minor_faults']:.0f} minor page faults, {prof['system_s'] * 1e3:.0f} ms "
            "system time")
    lines = [head, "| ms | what |", "|---:|---|"]
    lines += [f"| {v:.1f} | {k} |" for k, v in shown]
    if rest:
        lines.append(f"| {rest:.1f} | {len(rows) - top} others |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    malloc = set_malloc(args.malloc)
    import dataclasses

    import torch

    import flaxres
    from bench.speed import cli, jax_runner, torch_runner
    from train.config import CIFAR_MEAN, CIFAR_STD

    torch.set_num_threads(args.threads)
    images, labels = cli._batch(argparse.Namespace(input_size=32, batch_size=args.batch_size,
                                                   num_classes=10), seed=0)
    jb = jax_runner.build(args.arch, images, labels, num_classes=10, precision="fp32",
                          cpu_ops=dataclasses.replace(flaxres.CpuOps(), conv=args.cpu_conv),
                          mean=CIFAR_MEAN, std=CIFAR_STD)
    programs = jb.programs()
    out = {"arch": args.arch, "batch": args.batch_size, "threads": args.threads,
           "cpu_conv": args.cpu_conv, "malloc": malloc, "profiles": {}}
    for mode in ("train", "infer"):
        out["profiles"][f"flaxres {mode}"] = profile_flaxres(getattr(jb, mode), programs[mode],
                                                             args.reps)
    base = torch_runner.reference_with_weights_of(args.arch, jb.model, 10)
    x = jax_runner.normalized(images, CIFAR_MEAN, CIFAR_STD)
    for variant in cli._names(args.torch):
        tr = torch_runner.build(base, variant, x, labels, precision="fp32")
        for _ in range(2):  # torch.compile compiles on the first calls
            tr.train(), tr.infer()
        for mode in ("train", "infer"):
            out["profiles"][f"{variant} {mode}"] = profile_torch(getattr(tr, mode), args.reps)
    print(f"# {args.arch}, batch {args.batch_size}, {args.threads} threads, "
          f"--cpu-conv {args.cpu_conv}, --malloc {malloc}")
    for title, prof in out["profiles"].items():
        print(table(title, prof, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
