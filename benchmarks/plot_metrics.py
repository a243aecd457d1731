r"""Plots of the paper's metrics: vs training step (a training run's metrics.jsonl) or vs decoding steps (evaluation
job outputs of samples generated with different `generate.decoding_steps`).

  python benchmarks/plot_metrics.py --metrics=/runs/small/metrics.jsonl --out=benchmarks/results/training_metrics.png
  python benchmarks/plot_metrics.py --evaluations=eval/steps20,eval/steps40,eval/steps80 \
      --out=benchmarks/results/decoding_steps.png

Training: one panel per `eval_audio` metric (fad, kl, clap: `train.eval_metrics`) and the held-out `eval` loss,
against the step. Decoding steps: each evaluation dir's `metrics.json` (FAD, KL, CLAP) against the total decoding
steps of its samples (`generate.decoding_steps` in the generation job's `job.json`). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("fad", "kl", "clap")
LABELS = {"fad": "FAD (VGGish) ↓", "kl": "KL (PaSST) ↓", "clap": "CLAP score ↑", "loss": "eval loss ↓"}


def training_curves(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(step, value)]}` of the audio metrics (split eval_audio) and the eval loss in a metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        keys = METRICS if record["split"] == "eval_audio" else ("loss",) if record["split"] == "eval" else ()
        for key in keys:
            if key in record:
                curves.setdefault(key, []).append((int(record["step"]), float(record[key])))
    return {k: sorted(v) for k, v in curves.items()}


def decoding_sweep(directories: list[str | Path]) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(total decoding steps, value)]}` of evaluation job outputs."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for directory in directories:
        result = json.loads((Path(directory) / "metrics.json").read_text())
        job = json.loads((Path(result["settings"]["samples"]) / "job.json").read_text())
        steps = int(sum(job["generate"]["decoding_steps"]))
        for key in METRICS:
            if key in result:
                curves.setdefault(key, []).append((steps, float(result[key])))
    return {k: sorted(v) for k, v in curves.items()}


def plot(curves: dict[str, list[tuple[int, float]]], path: str | Path, *, xlabel: str, title: str) -> Path:
    """One panel per metric, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no metric to plot (no eval_audio / eval lines, or no metrics in the evaluations)")
    keys = [k for k in (*METRICS, "loss") if k in curves]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = zip(*curves[key])
        ax.plot(x, y, marker="o")
        ax.set_xlabel(xlabel)
        ax.set_title(LABELS[key], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics", help="a training run's metrics.jsonl")
    source.add_argument("--evaluations", help="comma-separated evaluation job output dirs")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "plot_metrics: error: matplotlib is not installed (pip install matplotlib); nothing plotted",
            file=sys.stderr,
        )
        return 2
    try:
        if args.metrics:
            curves = training_curves(args.metrics)
            path = plot(curves, args.out, xlabel="training step", title=f"{args.metrics}")
        else:
            curves = decoding_sweep(args.evaluations.split(","))
            path = plot(curves, args.out, xlabel="decoding steps (all codebooks)", title="metrics vs decoding steps")
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_metrics: error: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"plot_metrics: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
