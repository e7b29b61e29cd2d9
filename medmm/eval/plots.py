"""Plots people would rather look at than numbers: the training loss curve."""

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
        rows[int(r["step"])] = float(r["loss"])  # a resumed run rewrites steps: keep the last
    steps = sorted(rows)
    loss = [rows[s] for s in steps]
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LM loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
