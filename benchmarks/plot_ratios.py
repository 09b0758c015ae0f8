#!/usr/bin/env python
"""Bar chart of speedups from the markdown table a benchmark log ends with.

  python benchmarks/plot_ratios.py LOG OUT_PNG [--title TITLE]

Works on the logs of llama_batch.py (column "fxfuse vs unfused", one bar per
shape) and unet_step.py / diffusers_step.py (column "vs inductor", one bar
per variant). Each bar is the ratio the benchmark printed (medians measured
in one run); a dashed line marks 1.0x, so a bar below it is a loss.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

RATIO_COLUMNS = ("fxfuse vs unfused", "vs inductor")


def read_table(log: Path) -> tuple[str, list[tuple[str, float]]]:
    """The last markdown table in `log`: (ratio column name, [(row label, ratio)])."""
    lines = [ln.strip() for ln in log.read_text().splitlines()]
    header_at = max(i for i, ln in enumerate(lines) if ln.startswith("|") and any(c in ln for c in RATIO_COLUMNS))
    cells = [c.strip() for c in lines[header_at].strip("|").split("|")]
    col = next(c for c in RATIO_COLUMNS if c in cells)
    k = cells.index(col)
    rows = []
    for ln in lines[header_at + 2:]:
        if not ln.startswith("|"):
            break
        row = [c.strip() for c in ln.strip("|").split("|")]
        m = re.match(r"([0-9.]+)x", row[k])
        if m:
            rows.append((row[0], float(m.group(1))))
    return col, rows


def plot(log: Path, out_png: Path, title: str = "") -> None:
    import matplotlib  # lazily: only this script needs it

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    col, rows = read_table(log)
    labels, ratios = [r[0] for r in rows], [r[1] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 4))
    colors = ["tab:blue" if r >= 1.0 else "tab:red" for r in ratios]
    bars = ax.bar(labels, ratios, color=colors)
    for bar, r in zip(bars, ratios):
        ax.annotate(f"{r:.3f}x", (bar.get_x() + bar.get_width() / 2, r), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_ylim(lo - 0.05, hi + 0.05)
    ax.set_ylabel(f"speedup ({col}, medians)")
    ax.set_title(title or log.name, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path)
    p.add_argument("out_png", type=Path)
    p.add_argument("--title", default="")
    a = p.parse_args()
    plot(a.log, a.out_png, a.title)
