"""Run metrics: one JSON object per step in metrics.jsonl, and a PNG of the curves.

The JSONL file is the source of truth for every plot and table; it is appended and flushed line by line, so a
crash loses at most the step in flight, and on resume the lines past the resumed step are dropped (they belong to
work that the checkpoint does not contain), and so is a torn last line (a crash mid-write). Any other line that is
not a JSON object stops the resume with its line number (the file is left as it is); the plot and the viewer skip
it with a warning. The plot is optional: without matplotlib it is skipped with a warning.
"""

import json
import math
import os

from vlaa_min.infra import distributed
from vlaa_min.infra.cli import UserError


class MetricsLogger:
    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.enabled = distributed.is_main()  # under torchrun rank 0 writes the file (its rows are global)
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        else:
            kept = [row for row in read_metrics(path) if row.get("step", 0) <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in kept)
            os.replace(path + ".tmp", path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str, skip_bad: bool = False) -> list[dict]:
    """The rows of a JSONL file; a complete line that is not a JSON object raises UserError naming it, or is
    skipped with a warning when skip_bad (readers that change nothing: the plot, the viewer)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows = []
    # Every complete line ends in a newline: what follows the last one is a write a crash cut short.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif skip_bad:
            print(f"warning: {path}:{number}: not a JSON object; skipped")
        else:
            raise UserError(f"{path}:{number}: not a JSON object ({line[:60]!r}); the file is corrupt there: "
                            f"delete or repair that line (the rest is kept as it is)")
    return rows


def plot_curves(runs: dict[str, str], keys: list[str], out_png: str, title: str = "") -> str | None:
    """Plot `keys` (one panel each) against step for every run {label: metrics.jsonl path}; returns out_png, or
    None when matplotlib is not installed. A key "name/*" draws every "name/<part>" metric in one panel (e.g.
    "reasoning_share/*": one line per reward type)."""
    try:
        import matplotlib
    except ImportError:
        print(f"warning: matplotlib is not installed, so no {out_png} (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(keys), 2)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, path in runs.items():
            rows = read_metrics(path, skip_bad=True)
            names = sorted({name for row in rows for name in row if name.startswith(key[:-1])}) \
                if key.endswith("/*") else [key]
            for name in names:
                points = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
                if points:
                    steps, values = zip(*points)
                    part = name.split("/", 1)[1] if key.endswith("/*") else ""
                    run = label if len(runs) > 1 or not part else ""  # one run's per-type lines: the type alone
                    ax.plot(steps, values, label=" ".join(filter(None, (run, part))), linewidth=1.2)
            if key.endswith("/*"):
                ax.legend(fontsize=7)
        ax.set_title(key.replace("/*", " per type"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
