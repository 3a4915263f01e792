"""``curves.png`` at the end of a run: train reward, eval pass@1 (and cons@k), response length and KL.

The x axis is ``global_step`` (optimizer steps over all stages); dashed lines mark where a recipe
stage starts. matplotlib's Agg backend, so it works on headless nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("reward/mean", "train reward (mean)"), ("eval/pass@1", "eval pass@1"),
          ("response_len/mean", "response length (tokens)"), ("kl", "KL to reference (0 when rl.kl_coef=0)"))
SIZE_IN, DPI = (10, 7), 100


def read_records(metrics_path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]


def _x(r: dict) -> float:
    return r.get("global_step", r.get("step", 0))


def plot_curves(records: list[dict], png: Path) -> Path:
    """Draw the four panels from metrics records and save ``png`` (1000x700 pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=SIZE_IN, dpi=DPI, sharex=True)
    train = [r for r in records if r.get("stage") == "grpo"]
    evals = [r for r in records if r.get("stage") == "eval" and "eval/pass@1" in r]
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        if key == "eval/pass@1":
            ax.plot([_x(r) for r in evals], [r[key] for r in evals], "o-", label="pass@1")
            cons = [r for r in evals if "eval/cons@k" in r]
            if cons:
                ax.plot([_x(r) for r in cons], [r["eval/cons@k"] for r in cons], "s--", label="cons@k")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="lower right")
        else:
            pts = [(_x(r), r[key]) for r in train if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), lw=1)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.grid(alpha=0.3)
    starts: dict[str, float] = {}
    for r in records:
        name = r.get("stage_name")
        if name is not None and name not in starts:
            starts[name] = _x(r)
    for ax in axes.flat:
        for x in starts.values():
            ax.axvline(x, color="gray", ls=":", lw=0.8)
    for name, x in starts.items():
        axes[0, 0].annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                            va="top", ha="right", color="gray")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step (all stages)")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
