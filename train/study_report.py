"""The degradation study's verdicts, plots and markdown report, from its ``summary.json`` dict.

Each claim of the tutorials becomes a check with the numbers it was judged on, so the report says
which claims held in *this* run rather than restating the paper.
"""

from __future__ import annotations

from pathlib import Path

from train import probe

# Thresholds of the no-BN plain net's "does not learn at all" (loss at ln 10 means uniform
# predictions; a logit spread over images under 0.01 means the output ignores the image).
LOSS_TOL = 0.02
CHANCE_ERROR = 0.88
ONE_CLASS_SHARE = 0.99
STATIC_SPREAD = 0.01
LEARNS_MARGIN = 0.1  # "trains" = test accuracy 10 points above the failing net: ~10 sigma of
# chance-level noise on 1000 test images, and what 5 quick epochs on 2048 images can reach

PLOTS = ("training_curves.png", "grad_norm.png", "act_std.png", "predictions.png")


def _final(net: dict, key: str) -> float:
    return net["history"][-1][key]


def _init_ratio(net: dict) -> float:
    return probe.first_to_last_ratio(net["probes"]["0"]["grad_norm"])


def claims(summary: dict) -> list[dict]:
    """``[{"id", "claim", "held", "numbers"}]`` for every claim whose nets are in the study."""
    nets, roles = summary["nets"], summary["study"]["roles"]
    r = {role: nets[label] for role, label in roles.items() if label in nets}
    lab = roles
    out = []

    def add(cid: str, text: str, held: bool, numbers: str) -> None:
        out.append({"id": cid, "claim": text, "held": bool(held), "numbers": numbers})

    if {"bn_plain_shallow", "bn_plain_deep"} <= r.keys():
        a, b = (_final(r[k], "train_error") for k in ("bn_plain_shallow", "bn_plain_deep"))
        add("bn_plain_degrades", f"with BN, {lab['bn_plain_deep']} has higher training error "
            f"than {lab['bn_plain_shallow']}", b > a,
            f"final training error {b:.2%} vs {a:.2%}")
    if {"bn_res_shallow", "bn_res_deep"} <= r.keys():
        a, b = (_final(r[k], "train_error") for k in ("bn_res_shallow", "bn_res_deep"))
        add("bn_res_deeper_better", f"with BN, {lab['bn_res_deep']} has lower training error "
            f"than {lab['bn_res_shallow']}", b < a, f"final training error {b:.2%} vs {a:.2%}")
    if "nobn_plain" in r:
        p = r["nobn_plain"]
        name = lab["nobn_plain"]
        tl, sl = _final(p, "train_loss"), p["end"]["loss"]
        add("nobn_plain_loss_ln10", f"{name}'s loss stays at ln 10 = {probe.LN10:.4f}",
            abs(tl - probe.LN10) < LOSS_TOL and abs(sl - probe.LN10) < LOSS_TOL,
            f"final train loss {tl:.4f}, test loss {sl:.4f} (tolerance {LOSS_TOL})")
        err = p["end"]["error"]
        add("nobn_plain_chance", f"{name}'s accuracy stays at chance (10%)",
            err >= CHANCE_ERROR, f"test accuracy {1 - err:.2%}, train accuracy "
            f"{1 - _final(p, 'train_error'):.2%}")
        share = p["end"]["top_class_share"]
        add("nobn_plain_one_class", f"{name} predicts the same class for every image",
            share >= ONE_CLASS_SHARE, f"{share:.2%} of the test images get the most frequent "
            f"class at the end ({p['start']['top_class_share']:.2%} at init)")
        spread, change = p["end"]["logit_spread"], p["logit_change"]
        add("nobn_plain_logits_static", f"{name}'s logits barely move and ignore the image",
            spread < STATIC_SPREAD, f"logit spread over test images {spread:.2e} at the end "
            f"({p['start']['logit_spread']:.2e} at init; threshold {STATIC_SPREAD}); mean "
            f"|change| of the logits since init {change:.3f}")
    if {"nobn_plain", "nobn_res"} <= r.keys():
        a, b = r["nobn_plain"]["end"]["error"], r["nobn_res"]["end"]["error"]
        add("nobn_res_trains", f"{lab['nobn_res']} (same depth and width) trains",
            not r["nobn_res"]["diverged"] and b <= a - LEARNS_MARGIN,
            f"test accuracy {1 - b:.2%} vs {1 - a:.2%} for {lab['nobn_plain']}")
        pa, ra = _init_ratio(r["nobn_plain"]), _init_ratio(r["nobn_res"])
        add("grad_flow_nobn", "without BN the gradient at init vanishes towards the input in "
            "the plain net, not in the residual one", pa < ra,
            f"|grad| first conv / last conv at init: {pa:.3g} (plain) vs {ra:.3g} (residual)")
    if {"nobn_plain", "baseline"} <= r.keys():
        a, b = r["nobn_plain"]["end"]["error"], r["baseline"]["end"]["error"]
        add("baseline_trains", f"the shallow plain baseline {lab['baseline']} trains without "
            "BN", b <= a - LEARNS_MARGIN,
            f"test accuracy {1 - b:.2%} vs {1 - a:.2%}")
    if {"bn_plain_deep", "bn_res_deep"} <= r.keys():
        pa, ra = _init_ratio(r["bn_plain_deep"]), _init_ratio(r["bn_res_deep"])
        add("grad_flow_bn", f"with BN, less of the gradient reaches the input end of "
            f"{lab['bn_plain_deep']} than of {lab['bn_res_deep']} at init", pa < ra,
            f"|grad| first conv / last conv at init: {pa:.3g} (plain) vs {ra:.3g} (residual)")
    return out


def write(summary: dict, workdir: Path) -> None:
    """``report.md`` and the plots of :data:`PLOTS` into ``workdir``."""
    _plot_curves(summary, workdir / PLOTS[0])
    _plot_depth_profiles(summary, "grad_norm", "gradient L2 norm", workdir / PLOTS[1])
    _plot_depth_profiles(summary, "act_std", "activation std", workdir / PLOTS[2])
    _plot_predictions(summary, workdir / PLOTS[3])
    (workdir / "report.md").write_text(markdown(summary))


def markdown(summary: dict, plot_dir: str = ".") -> str:
    """The report: settings, per-net table, claims with verdicts, plots."""
    s = summary["study"]
    lines = [f"# Degradation and gradient flow ({summary['title']})", "",
             (f"{summary['n_train']} training / {summary['n_test']} test images, batch "
              f"{s['batch_size']}, augmentation {'on' if s['augment'] else 'off'}, seed "
              f"{s['seed']}, same data order for every net; {summary['platform']}."), "",
             ("| net | BN | init | epochs | lr | wd | train err | test err | test loss | "
              "top-class share (init → end) | logit spread (init → end) | grad ratio at init |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, n in summary["nets"].items():
        cfg = n["net"]
        status = " (diverged)" if n["diverged"] else ""
        lines.append(
            f"| {label}{status} | {'yes' if cfg['norm'] else 'no'} | {cfg['init']} | "
            f"{cfg['epochs']} | "
            f"{cfg['lr']}{' step' if cfg['step_decay'] else ''} | {cfg['weight_decay']} | "
            f"{_final(n, 'train_error'):.2%} | {n['end']['error']:.2%} | {n['end']['loss']:.4f} | "
            f"{n['start']['top_class_share']:.0%} → {n['end']['top_class_share']:.0%} | "
            f"{n['start']['logit_spread']:.2g} → {n['end']['logit_spread']:.2g} | "
            f"{_init_ratio(n):.3g} |")
    lines += ["", ("Train error is the running error over the last epoch (as in He et al.'s "
                   "curves); test numbers are on the test images at the end; logit spread is "
                   "the std of the logits over the test images (0 = the output ignores the "
                   "image); grad ratio is |grad| of the first conv over that of the last conv "
                   "before fc, from the first training step."), "", "## Claims", ""]
    for c in summary["claims"]:
        lines.append(f"- **{'held' if c['held'] else 'did not hold'}**: {c['claim']}: "
                     f"{c['numbers']}.")
    lines += ["", "## Plots", ""]
    lines += [f"![{p[:-4]}]({plot_dir}/{p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _groups(summary: dict) -> list[tuple[str, list[str]]]:
    nets = summary["nets"]
    bn_plain = [k for k, n in nets.items() if n["net"]["norm"] and not n["net"]["residual"]]
    bn_res = [k for k, n in nets.items() if n["net"]["norm"] and n["net"]["residual"]]
    nobn = [k for k, n in nets.items() if not n["net"]["norm"]]
    return [(t, g) for t, g in (("plain, BN", bn_plain), ("residual, BN", bn_res),
                                ("no BN", nobn)) if g]


def _plot_curves(summary: dict, path: Path) -> None:
    """He et al. Fig. 6: dashed training error, bold test error, per epoch."""
    plt = _pyplot()
    groups = _groups(summary)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (title, labels) in zip(axes[0], groups):
        for i, label in enumerate(labels):
            h = summary["nets"][label]["history"]
            ep = [r["epoch"] for r in h]
            colour = f"C{i}"
            ax.plot(ep, [100 * r["train_error"] for r in h], "--", color=colour)
            ax.plot(ep, [100 * r.get("test_error", float("nan")) for r in h], "-", lw=2,
                    color=colour, label=label)
        ax.set(title=title, xlabel="epoch", ylabel="error (%)")
        ax.grid(alpha=0.3)
        ax.legend(title="dashed: train, bold: test", fontsize=8)
    _save(fig, path)


def _plot_depth_profiles(summary: dict, key: str, what: str, path: Path) -> None:
    """``key`` per layer (or block) against depth, at init and at the end of training."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, when in zip(axes, ("init", "end")):
        for i, (label, n) in enumerate(summary["nets"].items()):
            step = "0" if when == "init" else str(max(int(s) for s in n["probes"]))
            vals = n["probes"][step][key]
            ax.plot(range(1, len(vals) + 1), vals, "-" if n["net"]["residual"] else "--",
                    marker=".", color=f"C{i}", label=label)
        ax.set(title=f"{what}, {'first step' if when == 'init' else 'last step'}",
               xlabel="layer (input → output)" if key == "grad_norm" else "stem, then block",
               yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(what)
    axes[1].legend(fontsize=7, title="dashed: plain")
    _save(fig, path)


def _plot_predictions(summary: dict, path: Path) -> None:
    """Predicted-class histogram on the test set, at init and at the end, one row per net."""
    plt = _pyplot()
    nets = summary["nets"]
    fig, axes = plt.subplots(len(nets), 2, figsize=(8, 1.4 * len(nets) + 0.6), sharex=True,
                             squeeze=False)
    for row, (label, n) in zip(axes, nets.items()):
        for ax, when in zip(row, ("start", "end")):
            hist = n[when]["pred_hist"]
            ax.bar(range(len(hist)), hist, color="C0" if n["net"]["residual"] else "C1")
            ax.set_ylim(0, summary["n_test"])
            ax.set_yticks([])
            ax.set_title(f"{label}, {'init' if when == 'start' else 'end'}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xticks(range(len(summary["classes"])), summary["classes"], rotation=60,
                      fontsize=7)
    _save(fig, path)
