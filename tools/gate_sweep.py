"""Bits per byte against deletion rate: train a gated config at several targets (and without a
gate, and with random deletion), then score each on the held-out documents with hard and soft
deletion, timing evaluation. Writes results.json and sweep.md in the output directory.

    python tools/gate_sweep.py CONFIG --output DIR [--targets 0.3,0.5] [--random 0.5] [key=value ...]
"""

import argparse
import json
import sys
from pathlib import Path

from hiermodel import config as config_lib
from hiermodel.errors import UserError


def _runs(config_path: str, overrides: list[str], output: Path, targets: list[float], random: list[float]):
    """(name, config) of every run: no gate, each target, each random-deletion rate."""
    variants = [("no gate", ["model.gate.layer=0"])]
    variants += [(f"learned {t:g}", [f"model.gate.target={t}"]) for t in targets]
    variants += [(f"random {r:g}", [f"model.gate.target={r}", "model.gate.mode=random"]) for r in random]
    for name, extra in variants:
        run_dir = output / name.replace(" ", "_")
        yield name, config_lib.load(config_path, [*overrides, *extra, f"run_dir={run_dir}"])


def _score(config, deletion: str) -> dict:
    import jax

    from hiermodel.run import encoding
    from hiermodel.data.sources import open_split
    from hiermodel.eval.score import make_score_fn, score_source
    from hiermodel.train import state as state_lib
    from hiermodel.run import open_latest
    from hiermodel.sharding import make_mesh

    mesh = make_mesh(config.mesh)
    checkpointer, step, _ = open_latest(config.run_dir)
    with jax.set_mesh(mesh):
        graphdef, abstract = state_lib.abstract_params(config, mesh)
        params = checkpointer.restore_params(step, abstract)
        checkpointer.close()
        score_fn = make_score_fn(graphdef, config.model.compute_dtype, mesh,
                                 jax.tree.map(lambda p: p.sharding, params), deletion)
        encoder = encoding(config)
        return score_source(score_fn, params, open_split(config.data, "eval", text=encoder.reads_text),
                            encoder.document, config.data, config.train.batch_size, mesh)


def training_rate(run_dir) -> dict | None:
    """Deletion in training over the second half of the run's logs: mean, min and max of the
    logged intervals (None without a gate)."""
    from hiermodel.train.metrics import read_metrics

    logged = read_metrics(run_dir)
    steps = sorted(logged)
    rates = [logged[s]["deletion"] for s in steps[len(steps) // 2:] if "deletion" in logged[s]]
    return {"mean": sum(rates) / len(rates), "min": min(rates), "max": max(rates)} if rates else None


def markdown(results: list[dict]) -> str:
    languages = sorted(results[0]["hard"]["per_language"])
    lines = ["| run | target | bpb (hard) | bpb (soft) | deleted (hard) | deleted (soft) | deleted in training "
             "(2nd half: mean, min-max) | overflow | positions after gate | "
             + " | ".join(f"deleted {lang}" for lang in languages) + " | eval bytes/s (hard) | eval bytes/s (soft) |",
             "|---" * (11 + len(languages)) + "|"]
    for r in results:
        hard, soft = r["hard"], r["soft"]
        rate = lambda entry: f"{entry['deletion_rate']:.1%}" if "deletion_rate" in entry else "-"
        per_language = " | ".join(rate(hard["per_language"][lang]) for lang in languages)
        overflow = f"{hard['overflow_rate']:.2%}" if "overflow_rate" in hard else "-"
        computed = f"{hard['positions_after_gate']:.1%}" if "positions_after_gate" in hard else "100%"
        t = r.get("training_rate")
        trained = f"{t['mean']:.1%} ({t['min']:.1%}-{t['max']:.1%})" if t else "-"
        lines.append(f"| {r['name']} | {r['target']} | {hard['bpb']:.4f} | {soft['bpb']:.4f} | {rate(hard)} | "
                     f"{rate(soft)} | {trained} | {overflow} | {computed} | {per_language} | {hard['bytes_per_s']:,.0f} | "
                     f"{soft['bytes_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.add_argument("--output", required=True)
    p.add_argument("--targets", default="0.3,0.5", help="learned gates at these deletion targets")
    p.add_argument("--random", default="", help="random deletion at these rates (the baseline)")
    args = p.parse_intermixed_args(argv)
    from hiermodel.train.loop import train

    try:
        targets = [float(t) for t in args.targets.split(",") if t]
        random = [float(r) for r in args.random.split(",") if r]
        output = Path(args.output)
        results = []
        for name, config in _runs(args.config, args.overrides, output, targets, random):
            print(f"== {name}: training {config.run_dir}", file=sys.stderr, flush=True)
            logged = train(config)
            hard, soft = _score(config, "hard"), _score(config, "soft")
            target = config.model.gate.target if config.model.gate.layer else 0.0
            results.append({"name": name, "target": target, "train": logged, "hard": hard, "soft": soft,
                            "training_rate": training_rate(config.run_dir)})
            (output / "results.json").write_text(json.dumps(results, indent=2))
            (output / "sweep.md").write_text(markdown(results))
            print(f"== {name}: bpb hard {hard['bpb']:.4f}, soft {soft['bpb']:.4f}", file=sys.stderr, flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
