"""Plot held-out bits per byte against training step, one panel per language, for several runs
side by side (continued pretraining: learning the new language, forgetting the old one).

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --output curves.png [--reach de=2.6 ...]

Reads each run's metrics.jsonl: the `bpb_LANG` of its evaluations (a run evaluated on one
language only contributes its overall `bpb`, labelled "all"). `--reach LANG=BPB` also prints,
for each run, the first evaluated step whose bits per byte on LANG are at most BPB.
"""

import argparse
import sys
from pathlib import Path

from hiermodel.errors import UserError
from hiermodel.train.metrics import read_metrics


def curves(run_dirs: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{language: {run: [(step, bpb), ...]}}."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run_dir in run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").exists():
            raise UserError(f"{run_dir}: no metrics.jsonl (not a hiermodel run, or it has not logged yet)")
        for step, record in sorted(read_metrics(run_dir, "eval").items()):
            languages = {k[4:]: v for k, v in record.items() if k.startswith("bpb_")} or {"all": record["bpb"]}
            for language, bpb in languages.items():
                out.setdefault(language, {}).setdefault(run_dir, []).append((step, bpb))
    if not out:
        raise UserError(f"{', '.join(run_dirs)}: no evaluations logged")
    return out


def first_step_reaching(points: list[tuple[int, float]], bpb: float) -> int | None:
    """The first evaluated step at or below `bpb`, or None if the run never got there."""
    return next((step for step, value in points if value <= bpb), None)


def plot(series: dict[str, dict[str, list[tuple[int, float]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(series), figsize=(4.4 * len(series), 3.8), squeeze=False)
    for axis, (language, runs) in zip(axes[0], sorted(series.items())):
        for run_dir, points in runs.items():
            steps, bpb = zip(*points)
            axis.plot(steps, bpb, marker="o", label=Path(run_dir).name)
        axis.set_title(f"held-out {language}")
        axis.set_xlabel("step")
        axis.set_ylabel("bits per byte")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _target(spec: str, series: dict) -> tuple[str, float]:
    language, _, value = spec.partition("=")
    try:
        bpb = float(value)
    except ValueError:
        raise UserError(f"--reach {spec}: expected LANG=BPB, such as de=2.6") from None
    if language not in series:
        raise UserError(f"--reach {spec}: no run logged {language} (logged: {', '.join(sorted(series))})")
    return language, bpb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--reach", action="append", default=[], metavar="LANG=BPB",
                   help="print the first step each run reaches BPB on LANG")
    args = p.parse_args(argv)
    try:
        series = curves(args.runs)
        targets = [_target(spec, series) for spec in args.reach]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(series, args.output)
    for language, bpb in targets:
        for run_dir, points in series[language].items():
            step = first_step_reaching(points, bpb)
            print(f"{run_dir}: {language} <= {bpb} at step {'never' if step is None else step}")
    print(f"wrote {args.output}: {', '.join(sorted(series))} for {len(args.runs)} runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
