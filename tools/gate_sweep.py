"""Bits per byte against deletion rate, over corpora and seeds: train a gated config without a
gate, at each target and with random deletion, for every corpus and seed; score each on the
held-out documents with hard (and soft) deletion, and each learned gate's random twin again at
the rate the learned gate deleted held out. Writes results.json, sweep.md (every run) and
summary.md (mean and spread over seeds, per corpus) in the output directory: the plan's runs,
then every other finished run found there (an earlier or larger sweep's), so a smaller sweep into
the same output never drops a run from its tables. A run whose result.json exists is not
repeated, so an interrupted sweep continues where it stopped.

    python tools/gate_sweep.py CONFIG --output DIR [--targets 0.3,0.5] [--random 0.5]
        [--seeds 0,1,2] [--corpus NAME=PATTERN[,PATTERN...] ...]
        [--variant "learned T, CHANGE=key=value key=value" ...] [--no-soft] [--finished] [key=value ...]

Each --corpus sets data.train and data.eval to its patterns (the config's holdout then picks the
held-out documents); without one, the config's data is the only corpus. Each --variant adds a
run with its overrides; a learned variant is compared with the random one that deletes at its
target from the same layers. In any override, {corpus} and {seed} become the run's corpus name
and seed: `init_from=runs/base/{corpus}/seed{seed}/no_gate` gates each corpus' and seed's own
trained model (MrT5's setting). --finished trains nothing: it summarises the plan's finished runs
(a stopped sweep's, or a part of a larger one's).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from hiermodel import config as config_lib
from hiermodel.errors import UserError

# MrT5's bar for a useful gate: at least this share of the positions deleted ...
MIN_DELETION = 0.40
# ... for at most this relative increase of bits per byte.
MAX_COST = 0.03


def _variants(targets: list[float], random: list[float], specs: list[str]) -> list[tuple[str, list[str]]]:
    variants = [("no gate", ["model.gate.layer=0"])]
    variants += [(f"learned {t:g}", [f"model.gate.target={t}"]) for t in targets]
    variants += [(f"random {r:g}", [f"model.gate.target={r}", "model.gate.mode=random"]) for r in random]
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not name.strip() or not overrides.strip():
            raise UserError(f"--variant {spec!r}: expected NAME=key=value [key=value ...]")
        variants.append((name.strip(), overrides.split()))
    return variants


def _corpus(spec: str) -> tuple[str, list[str]]:
    name, sep, patterns = spec.partition("=")
    if not sep or not name or not patterns:
        raise UserError(f"--corpus {spec!r}: expected NAME=PATTERN[,PATTERN...]")
    return name, [f"data.train=[{patterns}]", f"data.eval=[{patterns}]"]


def plan(config_path: str, overrides: list[str], variants: list[tuple[str, list[str]]], seeds: list[int],
         corpora: list[tuple[str, list[str]]], output: Path) -> list[tuple]:
    """(corpus, seed, variant name, config) of every run, seed by seed, so that an interrupted
    sweep has whole seeds over every corpus, each run in OUTPUT/[CORPUS/]seedS/VARIANT. {corpus}
    and {seed} are filled into the overrides."""
    planned = []
    for seed in seeds:
        for corpus, data in corpora:
            for name, extra in variants:
                # The same place whatever else the plan holds: a later sweep with more seeds or
                # corpora, or one seed of it, finds the finished runs.
                run_dir = output / (corpus if data else "") / f"seed{seed}" \
                    / "".join(c if c.isalnum() or c == "." else "_" for c in name)
                placed = [o.replace("{corpus}", corpus).replace("{seed}", str(seed)) for o in [*overrides, *data, *extra]]
                planned.append((corpus, seed, name,
                                config_lib.load(config_path, [*placed, f"seed={seed}", f"run_dir={run_dir}"])))
    return planned


def _score(run_dir, deletion: str, changes: dict | None = None) -> dict:
    """A run's held-out bits per byte and deletion; changes: config values put over the run's."""
    import jax

    from hiermodel.data.sources import open_split
    from hiermodel.eval.score import make_score_fn, score_source
    from hiermodel.run import encoding, load_params

    config, mesh, graphdef, params = load_params(str(run_dir), changes)
    with jax.set_mesh(mesh):
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


def _rate(entry: dict) -> str:
    return f"{entry['deletion_rate']:.1%}" if "deletion_rate" in entry else "-"


def markdown(results: list[dict]) -> str:
    """Every run: bits per byte, deletion overall and per language, overflow, eval speed."""
    languages = sorted({lang for r in results for lang in r["hard"]["per_language"]})
    lines = ["| corpus | seed | run | bpb (hard) | bpb (soft) | deleted (hard) | deleted (soft) | deleted in training "
             "(2nd half: mean, min-max) | overflow | positions after gate | "
             + " | ".join(f"deleted {lang}" for lang in languages) + " | eval bytes/s (hard) |",
             "|---" * (12 + len(languages)) + "|"]
    for r in results:
        hard, soft = r["hard"], r.get("soft")
        per_language = " | ".join(_rate(hard["per_language"][lang]) if lang in hard["per_language"] else "-"
                                  for lang in languages)
        overflow = f"{hard['overflow_rate']:.2%}" if "overflow_rate" in hard else "-"
        computed = f"{hard['positions_after_gate']:.1%}" if "positions_after_gate" in hard else "100%"
        t = r.get("training_rate")
        trained = f"{t['mean']:.1%} ({t['min']:.1%}-{t['max']:.1%})" if t else "-"
        soft_bpb = f"{soft['bpb']:.4f}" if soft else "-"
        speed = f"{hard['bytes_per_s']:,.0f}" if "bytes_per_s" in hard else "-"  # none from a single batch
        lines.append(f"| {r['corpus']} | {r['seed']} | {r['name']} | {hard['bpb']:.4f} | {soft_bpb} | {_rate(hard)} | "
                     f"{_rate(soft) if soft else '-'} | {trained} | {overflow} | {computed} | {per_language} | "
                     f"{speed} |")
    return "\n".join(lines) + "\n"


def _spread(values: list[float], fmt: str) -> str:
    """mean ± sample standard deviation (just the mean for one value)."""
    mean = statistics.fmean(values)
    return format(mean, fmt) + (f" ± {format(statistics.stdev(values), fmt.lstrip('+'))}" if len(values) > 1 else "")


def _random_twin(results: list[dict], run: dict) -> dict | None:
    """The random-deletion run of the same corpus and seed that deletes at `run`'s target from the
    same layers, its full layers reading the same keys: the learned gate's baseline."""
    shape = lambda r: (r["corpus"], r["seed"], r["target"], r.get("layer"), r.get("full_layers", 0),
                       r.get("full_keys", "all"), r.get("full_recent", 0))
    return next((r for r in results if r.get("mode", "random" if r["name"].startswith("random") else "learned")
                 == "random" and shape(r) == shape(run)), None)


def score_random_at_learned_rates(runs: list[dict], results: list[dict]) -> None:
    """Scores each learned run's random twin (found among results) again at the rate the learned
    gate deleted held out (set by where its last steps left its bias; the random one's is its
    target), kept in the learned run's result.json as random_at_rate: the two then differ in
    which positions they delete, not in how many."""
    for run in runs:
        twin = _random_twin(results, run) if run["name"].startswith("learned") else None
        if twin is None or "random_at_rate" in run or "deletion_rate" not in run["hard"]:
            continue
        rate = run["hard"]["deletion_rate"]
        print(f"== {run['corpus']}, seed {run['seed']}, {twin['name']}: scoring at {rate:.1%}, the learned "
              "gate's held-out rate", file=sys.stderr, flush=True)
        run["random_at_rate"] = _score(twin["run_dir"], "hard", {"model": {"gate": {"target": rate}}})
        _save(run)


def _save(run: dict) -> None:
    """A run's result.json; where it lies is its run_dir, which readers fill in."""
    (Path(run["run_dir"]) / "result.json").write_text(
        json.dumps({k: v for k, v in run.items() if k != "run_dir"}, indent=2))


def computed_share(run: dict) -> float | None:
    """Layer-positions the gated model computes at inference (hard deletion), as a share of the
    ungated model's: the layers before the gate and the full layers on every position, the gated
    ones on the capacity."""
    if not run.get("layer"):
        return 1.0
    if "layers" not in run:  # written before results recorded the stack's depth
        return None
    gated = run["layers"] - run["layer"] - run.get("full_layers", 0)
    return (run["layers"] - gated + gated * run["hard"]["positions_after_gate"]) / run["layers"]


def summarize(results: list[dict]) -> list[dict]:
    """Per corpus and variant, over seeds: bits per byte, deletion (held out, hard), the share of
    layer-positions computed, the relative cost against no gate and the difference to random
    deletion at the same rate from the same layers, both paired by seed."""
    by_key = {(r["corpus"], r["seed"], r["name"]): r for r in results}
    rows = []
    for corpus in dict.fromkeys(r["corpus"] for r in results):
        for name in dict.fromkeys(r["name"] for r in results if r["corpus"] == corpus):
            runs = [r for r in results if r["corpus"] == corpus and r["name"] == name]
            row = {"corpus": corpus, "name": name, "seeds": [r["seed"] for r in runs],
                   "bpb": [r["hard"]["bpb"] for r in runs],
                   "deleted": [r["hard"].get("deletion_rate", 0.0) for r in runs],
                   "computed": [computed_share(r) for r in runs]}
            base = [by_key.get((corpus, r["seed"], "no gate")) for r in runs]
            if name != "no gate" and all(base):
                row["cost"] = [r["hard"]["bpb"] / b["hard"]["bpb"] - 1 for r, b in zip(runs, base)]
            if name.startswith("learned"):
                random = [_random_twin(results, r) for r in runs]
                if all(random):
                    row["vs_random"] = [r["hard"]["bpb"] - q["hard"]["bpb"] for r, q in zip(runs, random)]
                if all("random_at_rate" in r for r in runs):
                    row["vs_random_at_rate"] = [r["hard"]["bpb"] - r["random_at_rate"]["bpb"] for r in runs]
            rows.append(row)
    return rows


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| corpus | run | seeds | bpb (hard) | deleted, held out | layer-positions computed | Δbpb vs no gate | "
             "learned − random (bpb) | learned − random at the learned rate (bpb) | MrT5's bar |", "|---" * 10 + "|"]
    for row in rows:
        cost = _spread([100 * c for c in row["cost"]], "+.2f") + "%" if "cost" in row else "-"
        vs_random = _spread(row["vs_random"], "+.4f") if "vs_random" in row else "-"
        at_rate = _spread(row["vs_random_at_rate"], "+.4f") if "vs_random_at_rate" in row else "-"
        computed = f"{statistics.fmean(row['computed']):.1%}" if None not in row["computed"] else "-"
        bar = "-"
        if "cost" in row and row["name"].startswith("learned"):
            met = (statistics.fmean(row["deleted"]) >= MIN_DELETION and statistics.fmean(row["cost"]) <= MAX_COST)
            bar = "met" if met else "not met"
        lines.append(f"| {row['corpus']} | {row['name']} | {len(row['seeds'])} | {_spread(row['bpb'], '.4f')} | "
                     f"{_spread([100 * d for d in row['deleted']], '.1f')}% | {computed} | {cost} | {vs_random} | "
                     f"{at_rate} | {bar} |")
    return "\n".join(lines) + "\n"


class SweepStopped(Exception):
    """A signal stopped a run: its result would be an unfinished model's, so the sweep stops too."""


def _run(config, corpus: str, seed: int, name: str, soft: bool) -> dict:
    from hiermodel.train.loop import train

    done = Path(config.run_dir) / "result.json"
    if done.exists():
        return {**json.loads(done.read_text()), "run_dir": config.run_dir}
    print(f"== {corpus}, seed {seed}, {name}: training {config.run_dir}", file=sys.stderr, flush=True)
    logged = train(config)
    if "stopped_by" in logged:
        raise SweepStopped(f"{logged['stopped_by']} stopped {config.run_dir} before train.steps (checkpointed); "
                           "rerun the same command to resume")
    gate = config.model.gate
    result = {"corpus": corpus, "seed": seed, "name": name, "run_dir": config.run_dir,
              "target": gate.target if gate.layer else 0.0,
              "layer": gate.layer, "full_layers": gate.full_layers, "full_keys": gate.full_keys,
              "full_recent": gate.full_recent,
              "mode": gate.mode if gate.layer else "none",
              "layers": config.model.backbone_layers,
              "train": logged, "hard": _score(config.run_dir, "hard"), "training_rate": training_rate(config.run_dir)}
    if soft:
        result["soft"] = _score(config.run_dir, "soft")
    _save(result)
    print(f"== {corpus}, seed {seed}, {name}: bpb {result['hard']['bpb']:.4f}", file=sys.stderr, flush=True)
    return result


def with_other_finished_runs(output: Path, results: list[dict], planned: list[tuple]) -> list[dict]:
    """`results`, then every finished run under `output` that the plan does not name."""
    planned_dirs = {Path(run[3].run_dir).resolve() for run in planned}
    others = [{**json.loads(p.read_text()), "run_dir": str(p.parent)} for p in sorted(output.glob("**/result.json"))
              if p.parent.resolve() not in planned_dirs]
    return results + others


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, for every run")
    p.add_argument("--output", required=True)
    p.add_argument("--targets", default="0.3,0.5", help="learned gates at these deletion targets")
    p.add_argument("--random", default="", help="random deletion at these rates (the baseline)")
    p.add_argument("--seeds", default="0", help="seeds (initialisation and data order)")
    p.add_argument("--corpus", action="append", default=[], help="NAME=PATTERN[,PATTERN...]; repeatable")
    p.add_argument("--variant", action="append", default=[], help="NAME=key=value [key=value ...]; repeatable")
    p.add_argument("--no-soft", dest="soft", action="store_false", help="score hard deletion only")
    p.add_argument("--finished", action="store_true", help="train nothing; summarise the finished runs")
    args = p.parse_intermixed_args(argv)
    try:
        targets = [float(t) for t in args.targets.split(",") if t]
        random = [float(r) for r in args.random.split(",") if r]
        seeds = [int(s) for s in args.seeds.split(",") if s]
        corpora = [_corpus(spec) for spec in args.corpus] or [("config", [])]
        output = Path(args.output)
        planned = plan(args.config, args.overrides, _variants(targets, random, args.variant), seeds, corpora, output)
        results = []
        if args.finished:
            planned = [run for run in planned if (Path(run[3].run_dir) / "result.json").exists()]
            if not planned:
                raise UserError(f"{output}: no run of this plan has finished")
        for corpus, seed, name, config in planned:  # every config loads (and fails) before any training
            results.append(_run(config, corpus, seed, name, args.soft))
            output.mkdir(parents=True, exist_ok=True)
            everything = with_other_finished_runs(output, results, planned)
            score_random_at_learned_rates(results, everything)
            (output / "results.json").write_text(json.dumps(everything, indent=2))
            (output / "sweep.md").write_text(markdown(everything))
            (output / "summary.md").write_text(summary_markdown(summarize(everything)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    print(summary_markdown(summarize(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
