"""The training loss curve, drawn from a run's ``metrics.jsonl`` at the end of every run (``loss.png``)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, title: str = "training loss") -> Path:
    """Loss (and a moving average) against step from a trainer's ``metrics.jsonl``; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, float] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:  # (an evaluation-only row, e.g. step 0's, has none)
            rows[int(r["step"])] = float(r["loss"])  # a resumed run rewrites steps: keep the last
    steps = sorted(rows)
    loss = [rows[s] for s in steps]
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (the stage's objective)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_metric_curve(metrics_jsonl: str | Path, key: str, out_png: str | Path, title: str | None = None,
                      log_scale: bool = False) -> Path | None:
    """One logged value (e.g. ``eval_ppl``) against step from ``metrics.jsonl``; None when no row holds it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, float] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        r = json.loads(line)
        if isinstance(r.get(key), (int, float)):
            rows[int(r["step"])] = float(r[key])
    if not rows:
        return None
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [rows[s] for s in steps], marker="o")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
