#!/usr/bin/env python
"""Bar chart of decode tok/s from llama_decode.py's results.json.

  python benchmarks/plot.py RESULTS_JSON OUT_PNG

Each bar is a variant's median tok/s, labelled with its speedup over `unfused`;
the whisker spans the slowest and fastest repeat, so a speedup inside it is noise.
Variants that failed are drawn as an empty slot labelled with the error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(results_json: Path, out_png: Path) -> None:
    import matplotlib  # lazily: only this script needs it

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    data = json.loads(Path(results_json).read_text())
    meta, variants = data["meta"], data["variants"]
    names = list(variants)
    med = [variants[n].get("decode_tok_s") or 0.0 for n in names]
    runs = [variants[n].get("decode_tok_s_all") or [0.0] for n in names]
    lo = [m - min(r) for m, r in zip(med, runs)]
    hi = [max(r) - m for m, r in zip(med, runs)]

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4.5))
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=4, color="tab:blue")
    for bar, n in zip(bars, names):
        r = variants[n]
        if "error" in r or not r.get("decode_tok_s"):
            label = "failed: " + str(r.get("error", "no result")).split(": ", 1)[-1][:50]
            ax.text(bar.get_x() + bar.get_width() / 2, 0, label, rotation=90,
                    ha="center", va="bottom", fontsize=7)
            continue
        sp = r.get("decode_speedup")
        label = f"{r['decode_tok_s']:.1f}" + (f"\n{sp:.3f}x" if sp is not None else "")
        top = max(variants[n].get("decode_tok_s_all") or [bar.get_height()])  # above the whisker
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 10), textcoords="offset points", ha="center", fontsize=8)
    bw, bpt = meta.get("copy_bw_gb_s"), meta.get("bytes_per_token")
    if bw and bpt:  # the memory-bound floor: every weight and the KV cache read once per token
        ax.axhline(bw * 1e9 / bpt, color="gray", ls="--", lw=1, label="copy-bandwidth bound")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("decode tok/s (median; whiskers: min-max)")
    ax.set_ylim(0, max([max(r) for r in runs] + [1.0]) * 1.25)
    ax.set_title(f"{meta.get('card')}  torch {meta.get('torch')}  mode={meta.get('mode')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
