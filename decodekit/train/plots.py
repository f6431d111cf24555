"""Training curves: loss over optimizer steps, and held-out acceptance by draft depth after each epoch."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: dict, out: str | Path) -> list[Path]:
    """Write `loss.png` and `acceptance.png` into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    train = history.get("train", [])
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in train]
        for key in ("loss", "ce1"):
            values = [r.get(key, float("nan")) for r in train]
            window = max(1, len(values) // 50)  # a moving average: single steps are noisy
            smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{history['config']['arch']} head: training loss")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "loss.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    evals = history.get("eval", [])
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in evals:
            depth = range(1, len(r["cumulative"]) + 1)
            ax.plot(depth, r["cumulative"], marker="o", label=f"epoch {r['epoch']} (tau {r['tau']:.2f})")
        ax.set_xlabel("draft depth")
        ax.set_ylabel("P(first d drafts accepted)")
        ax.set_ylim(0, 1)
        ax.set_title("held-out teacher-forced acceptance (greedy chain)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "acceptance.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
