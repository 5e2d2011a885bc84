"""The run's PNG: loss and rewards/margins over optimizer steps (train and eval)."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(history: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/margins", "rewards/margins"),
              ("rewards/accuracies", "rewards/accuracies")]
    panels = [p for p in panels if any(p[0] in r or f"eval_{p[0]}" in r for r in history)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            rows = [r for r in history if prefix + key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[prefix + key] for r in rows], style,
                        label="eval" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
