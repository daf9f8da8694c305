"""What a training run shows and leaves behind: ``metrics.jsonl``, ``curves.png``, the epoch
summary line and the progress bar. Only the main process writes (see
:func:`train.parallel.is_main_process`); the others get a silent :class:`Report`."""

from __future__ import annotations

import json
from pathlib import Path


def format_epoch(h: dict) -> str:
    """One epoch's summary line: train, val and test loss/accuracy (and the EMA's), lr, time,
    throughput."""
    parts = [f"epoch {h['epoch']:>3}", f"train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}"]
    for split in ("val", "test", "ema_val", "ema_test"):
        if f"{split}_loss" in h:
            parts.append(f"{split} loss {h[f'{split}_loss']:.4f} acc {h[f'{split}_acc']:.2%}")
    parts += [f"lr {h['lr']:.4g}", f"{h['epoch_time']:.1f}s", f"{h['img_per_s']:.0f} img/s"]
    return " | ".join(parts)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs test (and val): the plot every CIFAR seed ends with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test", "ema_test"):
            key = f"{split}_{what}"
            if key in history[0]:
                vals = [h[key] * (100 if what == "acc" else 1) for h in history]
                ax.plot(ep, vals, marker="." if len(ep) < 30 else None, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if what == "loss" else "accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or path.parent.name)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


class Report:
    """``metrics.jsonl``, ``curves.png`` and console lines of one run; a no-op unless ``enabled``
    (every process but the main one)."""

    def __init__(self, workdir: Path, enabled: bool, plot_title: str | None):
        self.metrics_path = workdir / "metrics.jsonl"
        self.curves_path = workdir / "curves.png"
        self.enabled = enabled
        self.plot_title = plot_title  # None: no plot

    def restart(self, history: list[dict]) -> None:
        """Rewrites metrics.jsonl from the checkpoint's history, so lines written after the last
        checkpoint by a killed run disappear and the file equals an uninterrupted run's."""
        if self.enabled:
            self.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    def epoch(self, history: list[dict]) -> None:
        """Appends the last epoch to metrics.jsonl, redraws the curves, prints its summary."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        if self.plot_title is not None:
            plot_curves(history, self.curves_path, self.plot_title)
        print(format_epoch(history[-1]), flush=True)

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def progress_bar(self, epoch: int, done: int, total: int):
        """A tqdm bar for one epoch (disabled off the main process and when not a terminal)."""
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}", leave=False,
                    unit="step", dynamic_ncols=True, disable=None if self.enabled else True)
