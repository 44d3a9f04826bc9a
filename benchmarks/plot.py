"""Bar charts of a results CSV: ``python -m benchmarks.plot benchmarks/results/x.csv [--out x.png]``.

One figure per CSV (per device, if a CSV holds several): the top panel shows median time
(p20-p80 as error bars), the bottom panel peak extra memory; groups are (shape, mode) points,
bars are providers. Only the latest row per (provider, mode, shape, device) is drawn.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .harness import latest, read_rows


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def plot_csv(csv_path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw ``csv_path``; returns the PNG paths written (``<csv stem>[-<device>].png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    rows = latest(read_rows(csv_path))
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    devices = list(dict.fromkeys(r.get("device", "") for r in rows))
    written = []
    for dev in devices:
        sub = [r for r in rows if r.get("device", "") == dev]
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        points = list(dict.fromkeys((r["shape"], r["mode"]) for r in sub))
        by = {(r["provider"], r["shape"], r["mode"]): r for r in sub}
        width = 0.8 / max(1, len(providers))
        fig_w = max(6.0, 1.1 * len(points) * max(1, len(providers)) * 0.45 + 2)
        fig, axes = plt.subplots(2, 1, figsize=(fig_w, 8), sharex=True)
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(points))]
            rs = [by.get((p, s, m)) for s, m in points]
            med = [_f(r["median_ms"]) if r else math.nan for r in rs]
            lo = [m - _f(r["p20_ms"]) if r else 0.0 for m, r in zip(med, rs, strict=True)]
            hi = [_f(r["p80_ms"]) - m if r else 0.0 for m, r in zip(med, rs, strict=True)]
            bars = axes[0].bar(xs, med, width, yerr=[lo, hi], capsize=2, label=p)
            axes[0].bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
            mem = [_f(r["peak_mb"]) if r else math.nan for r in rs]
            bars = axes[1].bar(xs, mem, width, label=p)
            axes[1].bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
        op = sub[0].get("op", csv_path.stem)
        axes[0].set_ylabel("median time (ms), p20-p80")
        axes[0].set_title(f"{op} — {dev} — commit {sub[-1].get('commit', '?')}", fontsize=9)
        axes[0].legend(fontsize=8)
        axes[1].set_ylabel("peak extra memory (MB)")
        axes[1].set_xticks(range(len(points)))
        axes[1].set_xticklabels([f"{s}\n{m}" for s, m in points], fontsize=7, rotation=0)
        for ax in axes:
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        if out is not None and len(devices) == 1:
            path = Path(out)
        else:
            suffix = "" if len(devices) == 1 else "-" + re.sub(r"[^A-Za-z0-9]+", "_", dev)[:40]
            path = csv_path.with_name(csv_path.stem + suffix + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="PNG path (default: next to the CSV)")
    args = ap.parse_args(argv)
    csv_path = Path(args.csv)
    if not csv_path.is_file():
        ap.error(f"{csv_path}: no such results CSV")
    if args.out is not None and (
        Path(args.out).suffix.lower() != ".png" or Path(args.out).is_dir()
    ):
        ap.error(f"--out {args.out}: must be a .png file path")
    try:
        paths = plot_csv(csv_path, args.out)
    except (ValueError, KeyError) as e:  # no rows, or not a results CSV (a missing column)
        ap.error(f"{csv_path}: cannot plot it: {e}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
