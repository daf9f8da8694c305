"""The results as a record of the machine, a markdown table and a bar chart."""

from __future__ import annotations

import os

from train.host import host

FRAMEWORKS = ("flaxres-jit", "torch-eager", "torch-channels_last", "torch-compile")


def machine() -> dict:
    """The host (:func:`train.host.host`), PyTorch's versions and the load average: what a
    timing depends on."""
    import torch
    import torchvision

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {**host(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "loadavg_start": load}


def _policy_line(results: dict) -> str:
    p = results.get("precision_policy")
    if not p:
        return "Matmul/convolution precision policy: not recorded."
    torch_parts = ", ".join(f"{k.removeprefix('torch.backends.').removesuffix('.fp32_precision')}"
                            f"={v}" for k, v in p.items() if k.startswith("torch."))
    return (f"Matmul/convolution precision policy `{p['policy']}` (set in both frameworks): "
            f"jax_default_matmul_precision={p['jax_default_matmul_precision']}; torch "
            f"fp32_precision {torch_parts}.")


def markdown(results: dict) -> str:
    """The table of img/s, % of peak and speed-ups over eager, with the conditions above it."""
    m, args, peak = results["machine"], results["args"], results["peak"]
    machine_line = (
        f"Machine: {m['cpu']}, {m['cores']} cores, threads={args['threads']}; "
        f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}; {m['date_utc']}; "
        f"load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}; "
        f"JAX on {', '.join(m.get('devices', []))}, PyTorch on "
        f"{results.get('torch_device', 'cpu')}.")
    peak_line = (
        f"Peak ({args['precision']} matmul {peak['matmul_n']}^3): "
        f"{peak['peak_flop_s'] / 1e9:.1f} GFLOP/s (jax {peak['jax_flop_s'] / 1e9:.1f}, "
        f"torch {peak['torch_flop_s'] / 1e9:.1f}). flaxres CPU ops: {results['flaxres_ops']}, "
        f"CPU convolutions: {results.get('cpu_conv', 'xla')}, malloc: "
        f"{results.get('malloc', 'glibc')}. "
        "Median over the timed reps, (range) = slowest–fastest rep; "
        f"{results.get('timing', 'reps interleaved across frameworks')}.")
    lines = [machine_line, peak_line, _policy_line(results), ""]
    lines.append("| arch | framework | train img/s (range) | train % peak | train vs eager | "
                 "infer img/s (range) | infer % peak | infer vs eager | compile s (train/infer) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for arch, r in results["archs"].items():
        eager = r["frameworks"].get("torch-eager", {})
        for fw, v in r["frameworks"].items():
            cells, comp = [arch, fw], []
            for mode, mult in (("train", 3), ("infer", 1)):
                s = v.get(mode)
                if not s:
                    cells += ["–", "–", "–"]
                    continue
                lo, hi = s["img_s_range"]
                cells.append(f"{s['img_s']:.0f} ({lo:.0f}–{hi:.0f})")
                achieved = s["img_s"] * mult * r["flops_per_image"]
                cells.append(f"{100 * achieved / peak['peak_flop_s']:.0f}%")
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
        if line := _against_fastest(arch, r):
            lines.append(line)
    for arch, r in results["archs"].items():
        e = r.get("e2e")
        if e:
            parts = [f"{fw} {e[fw]['img_s']:.0f} img/s (epoch ≈ {e[fw]['epoch_s_est']:.0f} s)"
                     for fw in ("flaxres-jit", "torch-eager") if fw in e]
            lines.append(f"- end to end {arch} ({e['images']} of {e['of_epoch']} training images "
                         f"timed): " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def fastest_torch_ratio(frameworks: dict, mode: str) -> float | None:
    """flaxres's img/s over the fastest PyTorch variant's, in one mode (None if either is
    missing)."""
    torch = [v[mode]["img_s"] for fw, v in frameworks.items()
             if fw.startswith("torch") and mode in v]
    mine = frameworks.get("flaxres-jit", {}).get(mode)
    return mine["img_s"] / max(torch) if torch and mine else None


def _against_fastest(arch: str, r: dict) -> str:
    parts = []
    for mode in ("train", "infer"):
        ratio = fastest_torch_ratio(r["frameworks"], mode)
        if ratio is None:
            continue
        rounds = [fastest_torch_ratio(rnd, mode) for rnd in r.get("rounds", [])]
        each = f" (rounds: {', '.join(f'{x:.2f}×' for x in rounds)})" if rounds else ""
        parts.append(f"{mode} {ratio:.2f}×{each}")
    return f"- {arch}: flaxres ÷ the fastest PyTorch: {'; '.join(parts)}." if parts else ""


def plot(results: dict, path: str) -> None:
    """Bars of train and infer img/s per architecture and framework."""
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
        a = results["args"]
        ax.set_title(f"{mode} (img/s, batch {a['batch_size']}, {a['precision']}, "
                     f"{a.get('matmul_precision', '?')})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
