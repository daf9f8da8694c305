"""Framework speed comparison: flaxres (jax.jit) vs PyTorch eager, channels_last and torch.compile.

    python -m parity.speed --arch resnet20,resnet56,resnet18_cifar --batch-size 128 \
        [--precision fp32|bf16] [--threads N] [--reps 10] [--json out.json] [--md out.md] \
        [--plot out.png] [--skip-e2e | --data-dir ../shared/data/cifar10-jpeg.tar.gz]

For each architecture, with the same weights in both frameworks (flaxres weights exported with
``flaxres.convert.to_torch``; eval logits compared and reported), the same batch already in memory,
the same dtype and the same number of CPU threads:

* train step (forward + backward + SGD update with momentum and weight decay; BatchNorm in train
  mode) and inference (eval mode) throughput in img/s. Compile / warm-up time is measured
  separately; then ``--reps`` timed repetitions; median and spread (min..max, IQR); every rep
  ends with a device sync (``block_until_ready``; CPU torch is synchronous). Each framework runs
  in a fresh process of its own, one after the other (on 2 cores, interleaving torch's and XLA's
  thread pools in one process collapsed torch's training throughput ~8x); ``--interleave`` times
  them in one process, one rep of each in turn, so that load changes on a shared machine hit all
  alike;
* model FLOPs per image (2 x multiply-adds of convs and the classifier, counted from the jaxpr;
  a train step counts 3x the forward) and achieved FLOP/s as a % of the peak measured in the same
  run (best of a large fp32 / bf16 matmul in JAX and in torch);
* end to end (unless ``--skip-e2e``): each framework's idiomatic input pipeline feeding the train
  step: flaxres gathers, augments (pad-4 random crop + flip) and normalises on the device inside
  the jitted step (``train.data``); PyTorch uses ``DataLoader`` + torchvision ``RandomCrop``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` over PIL images, as the reference CIFAR
  scripts train. Both start from the same decoded uint8 arrays (decoding is cached once and not
  timed). ``--e2e-images`` limits the measured part of the epoch (the table says how many).

Threads: ``--threads N`` sets torch's intra-op threads and OMP/MKL threads to N, turns on XLA's
multi-threaded Eigen (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=true``, before jax is imported)
and, when N is below the core count, pins the process to N cores (XLA:CPU sizes its thread pool
by the cores it may use); the default is every core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

FRAMEWORKS = ("flaxres-jit", "torch-eager", "torch-channels_last", "torch-compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m parity.speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet20", help="comma-separated registry names")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32, help="square input resolution")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (>= 10 for results)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after compilation")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"subset of {','.join(FRAMEWORKS)}")
    p.add_argument("--modes", default="train,infer", help="train, infer or both")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end input pipeline run")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..",
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
                   help="flaxres with flaxres.ops disabled (lax convolutions, autodiff BatchNorm), "
                        "for before/after comparisons")
    return p.parse_args(argv)


def set_threads(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=true"
    os.environ["XLA_FLAGS"] = flags.strip()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and n < len(cpus):  # XLA:CPU sizes its pool by the cores it may use: pin both
        os.sched_setaffinity(0, cpus[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


# ----------------------------------------------------------------------------- measurement


@dataclass
class Timing:
    compile_s: float = 0.0
    times_s: list[float] = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        t = sorted(self.times_s)
        med = statistics.median(t)
        q1, q3 = (statistics.quantiles(t, n=4)[0], statistics.quantiles(t, n=4)[2]) if len(t) > 1 \
            else (med, med)
        return {"img_s": batch / med, "median_ms": med * 1e3, "min_ms": t[0] * 1e3,
                "max_ms": t[-1] * 1e3, "iqr_ms": (q3 - q1) * 1e3,
                "img_s_range": [batch / t[-1], batch / t[0]], "compile_s": self.compile_s,
                "reps": len(t)}


def timed(fn) -> float:
    s = time.perf_counter()
    fn()
    return time.perf_counter() - s


def interleave(runners: dict, reps: int, warmup: int) -> dict[str, Timing]:
    """``runners``: name -> (compile_fn, step_fn), each step_fn synchronous."""
    out = {}
    for name, (first, _) in runners.items():
        out[name] = Timing(compile_s=timed(first))
    for _ in range(warmup):
        for _, step in runners.values():
            step()
    for _ in range(reps):
        for name, (_, step) in runners.items():
            out[name].times_s.append(timed(step))
    return out


def peak_flops(precision: str) -> dict:
    """Best of a large square matmul in JAX and in torch (same threads), FLOP/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    n = 2048 if precision == "bf16" else 4096
    jdt = jnp.bfloat16 if precision == "bf16" else jnp.float32
    tdt = torch.bfloat16 if precision == "bf16" else torch.float32
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jdt)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    jt = min(timed(lambda: mm(a).block_until_ready()) for _ in range(5))
    ta = torch.randn(n, n, dtype=tdt)
    torch.mm(ta, ta)
    tt = min(timed(lambda: torch.mm(ta, ta)) for _ in range(5))
    f = 2 * n ** 3
    return {"matmul_n": n, "jax_flop_s": f / jt, "torch_flop_s": f / tt,
            "peak_flop_s": max(f / jt, f / tt)}


def forward_flops_per_image(graphdef, state, x) -> float:
    """2 x multiply-adds of every convolution and matmul in the forward jaxpr, per image."""
    import jax
    from flax import nnx
    from jax.extend import core as jcore

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                lhs, rhs = (v.aval for v in eqn.invars[:2])
                out = eqn.outvars[0].aval
                dn = eqn.params["dimension_numbers"]
                rhs_spec = dn.rhs_spec  # (out feature, in feature, spatial...)
                k = 1
                for d in rhs_spec[2:]:
                    k *= rhs.shape[d]
                total += 2.0 * out.size * k * rhs.shape[rhs_spec[1]]
            elif name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval
                c = 1
                for d in lc:
                    c *= lhs.shape[d]
                total += 2.0 * eqn.outvars[0].aval.size * c
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                    if isinstance(sub, jcore.ClosedJaxpr):
                        total += count(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        total += count(sub)
        return total

    closed = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s, copy=True)(x))(state, x)
    return count(closed.jaxpr) / x.shape[0]


# ----------------------------------------------------------------------------- flaxres


def build_jax(arch, args, x_np, y_np):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import flaxres
    from train.optim import sgd

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    cpu_ops = flaxres.CpuOps.off() if args.no_fast_ops else flaxres.CpuOps()
    model = flaxres.create_model(arch, num_classes=args.num_classes, dtype=dtype, cpu_ops=cpu_ops)
    tx = sgd(0.1, momentum=0.9, weight_decay=5e-4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, r, x, y):
        m = nnx.merge(graphdef, p, r, copy=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return loss, nnx.split(m, nnx.Param, ...)[2]

    def train_step(p, r, o, x, y):
        (loss, r), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r, x, y)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), r, o, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))

    emodel = nnx.merge(graphdef, params, rest, copy=True)
    emodel.eval()
    egraph, estate = nnx.split(emodel)
    infer = jax.jit(lambda s, x: nnx.merge(egraph, s, copy=True)(x))

    x = jnp.asarray(x_np)
    y = jnp.asarray(y_np)
    st = {"p": jax.tree.map(jnp.copy, params), "r": jax.tree.map(jnp.copy, rest)}
    st["o"] = tx.init(st["p"])

    def train_once():
        st["p"], st["r"], st["o"], loss = step(st["p"], st["r"], st["o"], x, y)
        loss.block_until_ready()

    def infer_once():
        infer(estate, x).block_until_ready()

    flops = forward_flops_per_image(egraph, estate, x[:1])
    return {"model": model, "train": (train_once, train_once), "infer": (infer_once, infer_once),
            "flops": flops, "logits": lambda: infer(estate, x), "train_fn": train_step, "tx": tx,
            "graphdef": graphdef, "params": params, "rest": rest}


# ----------------------------------------------------------------------------- PyTorch


def create_torch(arch, num_classes):
    try:
        from parity.reference import create_torch_model
    except ImportError as e:  # only while parity/reference.py does not exist yet
        mod = os.environ.get("FLAXRES_TORCH_REF_MODULE")
        if not mod:
            raise SystemExit(f"parity.reference is needed for the PyTorch side: {e}") from e
        import importlib
        create_torch_model = importlib.import_module(mod).create_torch_model
    return create_torch_model(arch, num_classes=num_classes)


def load_same_weights(tmodel, jmodel) -> str:
    import numpy as np
    import torch
    try:
        from flaxres.convert import to_torch
    except ImportError:
        return "random (flaxres.convert missing)"
    sd = to_torch(jmodel)
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}
    tmodel.load_state_dict(sd, strict=True)
    return "flaxres.convert.to_torch"


def build_torch(arch, args, x_np, y_np, jmodel, variants):
    import numpy as np
    import torch

    torch.manual_seed(0)
    base = create_torch(arch, args.num_classes)
    weights = load_same_weights(base, jmodel)
    xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y_np.astype(np.int64))
    autocast = args.precision == "bf16"
    out = {"weights": weights}

    def make(variant):
        import copy
        m = copy.deepcopy(base)
        x = xt
        if variant == "torch-channels_last":
            m = m.to(memory_format=torch.channels_last)
            x = xt.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        fwd = torch.compile(m) if variant == "torch-compile" else m

        def train_once():
            m.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(fwd(x), yt)
            loss.backward()
            opt.step()

        def infer_once():
            m.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                fwd(x)

        def logits():
            m.eval()
            with torch.no_grad():
                return fwd(x).float().numpy()
        return {"train": (train_once, train_once), "infer": (infer_once, infer_once),
                "logits": logits, "module": m}

    for v in variants:
        out[v] = make(v)
    return out


# ----------------------------------------------------------------------------- end to end


def e2e(arch, args, jb, tb) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from train import data as tdata
    from train.config import CIFAR_MEAN as mean, CIFAR_STD as std

    arrays = tdata.load_arrays("cifar10", args.data_dir)
    imgs, labels = arrays.train_images, arrays.train_labels
    n_total = len(labels)
    bs = args.batch_size
    n_img = min(args.e2e_images or n_total, n_total)
    steps = max(2, n_img // bs)
    res = {"images": steps * bs, "of_epoch": n_total}

    # flaxres: dataset on device as uint8; gather + augment + normalise inside the jitted step.
    tx, train_step = jb["tx"], jb["train_fn"]
    dimgs, dlabels = jax.device_put(imgs), jax.device_put(labels)

    def full_step(p, r, o, idx, key):
        x = tdata.normalize(tdata.augment(key, dimgs[idx]), mean, std)
        return train_step(p, r, o, x, dlabels[idx])

    jstep = jax.jit(full_step, donate_argnums=(0, 1, 2))
    p, r = jax.tree.map(jnp.copy, jb["params"]), jax.tree.map(jnp.copy, jb["rest"])
    o = tx.init(p)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    perm = tdata.epoch_permutation(key, 0, n_total)
    p, r, o, loss = jstep(p, r, o, perm[:bs], jax.random.fold_in(key, 0))
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        p, r, o, loss = jstep(p, r, o, perm[(i % (n_total // bs)) * bs:][:bs],
                              jax.random.fold_in(key, i))
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    res["flaxres-jit"] = {"img_s": steps * bs / dt, "seconds": dt, "compile_s": compile_s,
                          "epoch_s_est": n_total / (steps * bs / dt)}

    # PyTorch: DataLoader + torchvision transforms over PIL images, as the seeds train.
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n_total

        def __getitem__(self, i):
            return tf(Image.fromarray(imgs[i])), int(labels[i])

    m = tb["torch-eager"]["module"] if "torch-eager" in tb else None
    if m is None:
        return res
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    m.train()
    loader = torch.utils.data.DataLoader(DS(), batch_size=bs, shuffle=True,
                                         num_workers=args.workers, drop_last=True,
                                         persistent_workers=False)
    it = iter(loader)
    t0 = time.perf_counter()
    done = 0
    for i, (xb, yb) in enumerate(it):
        if i == 1:  # the first batch pays for worker start-up, like jit compilation
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
        if i >= 1:
            done += bs
        if i >= steps:
            break
    dt = time.perf_counter() - t0
    del it, loader
    res["torch-eager"] = {"img_s": done / dt, "seconds": dt, "compile_s": first_s,
                          "epoch_s_est": n_total / (done / dt), "workers": args.workers}
    return res


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    import jax
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        flags = info.get("flags", "").split()
        isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "")
        cpu = (f"{info.get('model name', cpu)} (family {info.get('cpu family')} model "
               f"{info.get('model')}{', ' + isa if isa else ''})")
    except (OSError, ValueError):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import flax
    import torchvision
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
            "flax": flax.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "devices": [str(d) for d in jax.devices()], "loadavg_start": load,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, threads={results['args']['threads']}; "
             f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}; {m['date_utc']}; "
             f"load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
             f"Peak ({results['args']['precision']} matmul {results['peak']['matmul_n']}^3): "
             f"{results['peak']['peak_flop_s'] / 1e9:.1f} GFLOP/s (jax "
             f"{results['peak']['jax_flop_s'] / 1e9:.1f}, torch "
             f"{results['peak']['torch_flop_s'] / 1e9:.1f}). flaxres.ops: {results['flaxres_ops']}. "
             "Median over the timed reps, (range) = slowest–fastest rep; "
             f"{results.get('timing', 'reps interleaved across frameworks')}.", ""]
    lines.append("| arch | framework | train img/s (range) | train % peak | train vs eager | "
                 "infer img/s (range) | infer % peak | infer vs eager | compile s (train/infer) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    peak = results["peak"]["peak_flop_s"]
    for arch, r in results["archs"].items():
        eager = r["frameworks"].get("torch-eager", {})
        for fw, v in r["frameworks"].items():
            cells = [arch, fw]
            comp = []
            for mode, mult in (("train", 3), ("infer", 1)):
                s = v.get(mode)
                if not s:
                    cells += ["–", "–", "–"]
                    continue
                lo, hi = s["img_s_range"]
                cells.append(f"{s['img_s']:.0f} ({lo:.0f}–{hi:.0f})")
                cells.append(f"{100 * s['img_s'] * mult * r['flops_per_image'] / peak:.0f}%")
                e = eager.get(mode)
                cells.append(f"{s['img_s'] / e['img_s']:.2f}×" if e else "–")
                comp.append(f"{s['compile_s']:.1f}")
            cells.append("/".join(comp))
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for arch, r in results["archs"].items():
        lines.append(f"- {arch}: {r['flops_per_image'] / 1e6:.1f} MFLOP/image forward "
                     f"(train = 3×); weights {r['weights']}; eval logits rel. diff flaxres vs "
                     f"torch {r.get('logits_rel_err', float('nan')):.1e}.")
    for arch, r in results["archs"].items():
        e = r.get("e2e")
        if e:
            parts = [f"{fw} {e[fw]['img_s']:.0f} img/s (epoch ≈ {e[fw]['epoch_s_est']:.0f} s)"
                     for fw in ("flaxres-jit", "torch-eager") if fw in e]
            lines.append(f"- end to end {arch} ({e['images']} of {e['of_epoch']} training images "
                         f"timed): " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    archs = list(results["archs"])
    fws = [f for f in FRAMEWORKS if any(f in results["archs"][a]["frameworks"] for a in archs)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("train", "infer")):
        w = 0.8 / len(fws)
        for i, fw in enumerate(fws):
            vals = [results["archs"][a]["frameworks"].get(fw, {}).get(mode, {}).get("img_s", 0)
                    for a in archs]
            ax.bar([j + i * w for j in range(len(archs))], vals, w, label=fw)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(archs))], archs)
        ax.set_title(f"{mode} (img/s, batch {results['args']['batch_size']}, "
                     f"{results['args']['precision']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    fws = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if args.interleave or len(fws) == 1:
        results = measure(args, fws)
    else:
        results = isolated(argv, args, fws)
    write(results, args)
    print()
    print(markdown(results))


def isolated(argv: list[str], args, fws: list[str]) -> dict:
    """Each framework timed by a fresh ``python -m parity.speed`` process of its own, in turn;
    the results merged; then the end-to-end run (itself one framework at a time) here."""
    import subprocess
    import tempfile
    results = None
    with tempfile.TemporaryDirectory() as d:
        for fw in fws:
            out = os.path.join(d, f"{fw}.json")
            cmd = [sys.executable, "-m", "parity.speed", *argv, "--frameworks", fw, "--skip-e2e",
                   "--json", out]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                sub = json.load(f)
            if results is None:
                results = sub
            else:
                for arch, r in sub["archs"].items():
                    mine = results["archs"][arch]
                    mine["frameworks"].update(r["frameworks"])
                    mine.update({k: v for k, v in r.items() if k not in mine})
                if sub["peak"]["peak_flop_s"] > results["peak"]["peak_flop_s"]:
                    results["peak"] = sub["peak"]
    results["args"] = vars(args)
    results["timing"] = "each framework in its own process, one after the other"
    if not args.skip_e2e:
        set_threads(args.threads)
        import numpy as np
        import torch
        torch.set_num_threads(args.threads)
        for arch in results["archs"]:
            x_np, y_np = _batch(args, np.random.default_rng(0))
            jb = build_jax(arch, args, x_np, y_np)
            tb = build_torch(arch, args, x_np, y_np, jb["model"], ["torch-eager"])
            results["archs"][arch]["e2e"] = e2e(arch, args, jb, tb)
    return results


def _batch(args, rng):
    s = args.input_size
    return (rng.standard_normal((args.batch_size, s, s, 3)).astype("float32"),
            rng.integers(0, args.num_classes, args.batch_size).astype("int32"))


def measure(args, fws: list[str]) -> dict:
    """Every framework in this process; reps interleaved so load changes hit all alike."""
    set_threads(args.threads)
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = {"args": vars(args), "machine": machine(), "archs": {},
               "flaxres_ops": "off (lax + autodiff BatchNorm)" if args.no_fast_ops else "on",
               "timing": "all frameworks in one process, reps interleaved"}
    print(f"# {results['machine']['cpu']}, threads={args.threads}, load "
          f"{results['machine']['loadavg_start']}", flush=True)
    results["peak"] = peak_flops(args.precision)
    print(f"peak {results['peak']['peak_flop_s'] / 1e9:.1f} GFLOP/s", flush=True)

    rng = np.random.default_rng(0)
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        x_np, y_np = _batch(args, rng)
        jb = build_jax(arch, args, x_np, y_np)
        tvars = [f for f in fws if f.startswith("torch")]
        tb = build_torch(arch, args, x_np, y_np, jb["model"], tvars)
        ref = tb["torch-eager"]["logits"]() if "torch-eager" in tb else None
        r = {"flops_per_image": jb["flops"], "weights": tb["weights"], "frameworks": {}}
        if ref is not None:
            got = np.asarray(jb["logits"](), np.float64)
            r["logits_rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        for mode in modes:
            runners = {}
            for fw in fws:
                src = jb if fw == "flaxres-jit" else tb[fw]
                runners[fw] = src[mode]
            timings = interleave(runners, args.reps, args.warmup)
            for fw, t in timings.items():
                r["frameworks"].setdefault(fw, {})[mode] = t.summary(args.batch_size)
                v = r["frameworks"][fw][mode]
                print(f"{arch:>14s} {mode:5s} {fw:20s} {v['img_s']:8.1f} img/s "
                      f"[{v['img_s_range'][0]:.0f}..{v['img_s_range'][1]:.0f}] "
                      f"compile {v['compile_s']:.1f}s", flush=True)
        if not args.skip_e2e:
            r["e2e"] = e2e(arch, args, jb, tb)
            print(f"{arch:>14s} e2e {json.dumps(r['e2e'])}", flush=True)
        results["archs"][arch] = r
        write(results, args)  # after every arch, so a long multi-arch run keeps what it measured
    return results


def write(results: dict, args) -> None:
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    sys.exit(main())
