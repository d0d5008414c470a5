"""Side by side: train several model configs at a matched budget on the same data, score them on
the same held-out documents, and write a Markdown table, a plot and the raw results.

Every number is in bits per raw UTF-8 byte; a matched FLOP budget uses each kind's analytic
training FLOPs per step (models/registry.py), so step counts differ while compute does not. An
eiw model's steps also pay for M1 compressing their bytes (the paper's accounting).
"""

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import jax

from hiermodel import config as config_lib
from hiermodel.config import Config
from hiermodel.data.pipeline import train_dataset
from hiermodel.data.sources import open_split, open_train
from hiermodel.errors import UserError
from hiermodel.run import compression_flops_per_byte, encoding, open_latest
from hiermodel.eval.perturb import Perturbation, PerturbedSource
from hiermodel.eval.score import make_score_fn, score_source
from hiermodel.models.registry import forward_flops, train_flops
from hiermodel.text import subword
from hiermodel.train import state as state_lib
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from hiermodel.sharding import make_mesh


@dataclasses.dataclass
class Plan:
    name: str
    config: Config
    steps: int
    step_flops: int  # analytic training FLOPs of one step (and M1's on its bytes, for eiw)
    m1_flops_per_byte: float = 0.0


def bytes_per_step(config: Config, batches: int = 8) -> float:
    """Mean raw bytes in a training batch, from the first batches of the real pipeline."""
    encoder = encoding(config)
    iterator = iter(train_dataset(config.data, open_train(config.data, encoder.reads_text), encoder.document,
                                  config.seed, config.train.batch_size))
    try:
        return statistics.mean(float(next(iterator)["token_bytes"].sum()) for _ in range(batches))
    finally:
        iterator.close()


def prepare_tokenizer(config: Config, output: Path) -> None:
    """A subword config gets a BPE trained on its own training split (once, kept in `output`)."""
    path = output / f"bpe{config.model.vocab_size}.json"
    if not path.exists():
        tokenizer = subword.train(open_split(config.data, "train").documents(), config.model.vocab_size,
                                  config.data.max_word_bytes)
        tokenizer.save(path)
    config.model.tokenizer = str(path)


def plan(model_configs: list[str], overrides: list[str], output: Path, budget_flops: float, budget_bytes: float,
         curve_points: int) -> list[Plan]:
    if (budget_flops > 0) == (budget_bytes > 0):
        raise UserError("give exactly one budget: --budget-flops or --budget-bytes")
    plans = []
    for path in model_configs:
        config = config_lib.load(path, overrides)
        name = Path(path).stem
        if not config.data.eval:
            raise UserError(f"{path}: data.eval is empty; the comparison needs held-out documents to score")
        config.run_dir = str(output / name)
        if config.model.kind == "subword":
            prepare_tokenizer(config, output)
        step_flops = config.train.batch_size * train_flops(config.model, config.data.row_tokens,
                                                           config.data.row_words)
        m1_per_byte = compression_flops_per_byte(config)
        if m1_per_byte:
            step_flops += int(m1_per_byte * bytes_per_step(config))
        per_step = step_flops if budget_flops > 0 else bytes_per_step(config)
        steps = int((budget_flops or budget_bytes) // per_step)
        if steps < curve_points:
            raise UserError(f"{path}: the budget buys only {steps} steps; raise it")
        config.train.steps = steps
        config.train.eval_every = max(1, steps // curve_points)
        config.train.checkpoint_every = config.train.eval_every
        config.train.warmup_steps = min(config.train.warmup_steps, max(1, steps // 10))
        plans.append(Plan(name, config, steps, step_flops, m1_per_byte))
    return plans


def _score_final(config: Config, perturbations: list[Perturbation], seed: int) -> dict:
    checkpointer, step, _ = open_latest(config.run_dir)
    mesh = make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1))
    with jax.set_mesh(mesh):
        graphdef, abstract = state_lib.abstract_params(config, mesh)
        params = checkpointer.restore_params(step, abstract)
        checkpointer.close()
        score_fn = make_score_fn(graphdef, config.model.compute_dtype, mesh,
                                 jax.tree.map(lambda p: p.sharding, params))
        encoder = encoding(config)
        document = encoder.document
        source = open_split(config.data, "eval", text=encoder.reads_text)
        score = lambda docs: score_source(score_fn, params, docs, document, config.data,
                                          config.train.batch_size, mesh, progress=True)
        started = time.monotonic()
        clean = score(source)
        clean["bytes_per_s"] = clean["bytes"] / (time.monotonic() - started)
        clean["perturbations"] = {}
        for perturbation in perturbations:
            noisy = score(PerturbedSource(source, perturbation, seed))
            clean["perturbations"][str(perturbation)] = noisy["bpb"] - clean["bpb"]
    return clean


def run(plans: list[Plan], perturbations: list[Perturbation], seed: int = 0) -> list[dict]:
    """Train (or finish) each plan, then score it; a rerun resumes where a crash stopped it."""
    results = []
    for p in plans:
        print(f"== {p.name}: {p.config.model.kind}, {p.steps} steps of {p.step_flops:.3g} FLOPs", flush=True)
        train(p.config)
        logged = read_metrics(p.config.run_dir)
        steady = [m for s, m in sorted(logged.items())][1:] or list(logged.values())  # skip compilation
        final = _score_final(p.config, perturbations, seed)
        model = p.config.model
        shape = (model, p.config.data.row_tokens, p.config.data.row_words)
        train_per_byte = statistics.mean(m["flops_per_byte"] for m in steady)
        model_per_byte = train_per_byte - p.m1_flops_per_byte  # the model's own, without M1's
        # Window shards keep no file names, so an eiw model has no languages to report.
        languages = final["per_language"] if encoding(p.config).reads_text else {}
        results.append({
            "name": p.name, "kind": model.kind, "params": state_lib.num_params(p.config), "steps": p.steps,
            "train_flops": p.steps * p.step_flops,
            "train_flops_per_byte": train_per_byte,
            "inference_flops_per_byte": model_per_byte * forward_flops(*shape) / train_flops(*shape)
                                        + p.m1_flops_per_byte,
            "train_bytes_per_s": statistics.median(m["bytes_per_s"] for m in steady),
            "eval_bytes_per_s": final["bytes_per_s"],
            "bpb": final["bpb"], "eval_bytes": final["bytes"],
            "bpb_by_language": {k: v["bpb"] for k, v in languages.items() if v["bytes"]},
            "degradation": final["perturbations"],
            "curve": [(step * p.step_flops, m["bpb"]) for step, m in sorted(read_metrics(p.config.run_dir, "eval").items())],
        })
    return results


def markdown(results: list[dict]) -> str:
    languages = sorted({k for r in results for k in r["bpb_by_language"]})
    perturbations = sorted({k for r in results for k in r["degradation"]})
    head = (["model", "kind", "params", "steps", "train FLOPs", "bpb"] + [f"bpb {k}" for k in languages]
            + ["train FLOPs/byte", "inference FLOPs/byte", "train bytes/s", "eval bytes/s"]
            + [f"Δbpb {k}" for k in perturbations])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = ([r["name"], r["kind"], f"{r['params'] / 1e6:.2f}M", str(r["steps"]), f"{r['train_flops']:.3g}",
                f"{r['bpb']:.4f}"] + [f"{r['bpb_by_language'].get(k, math.nan):.4f}" for k in languages]
               + [f"{r['train_flops_per_byte']:.3g}", f"{r['inference_flops_per_byte']:.3g}",
                  f"{r['train_bytes_per_s']:,.0f}", f"{r['eval_bytes_per_s']:,.0f}"]
               + [f"{r['degradation'].get(k, math.nan):+.4f}" for k in perturbations])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        flops, bpb = zip(*r["curve"]) if r["curve"] else ((), ())
        axes.plot(flops, bpb, marker="o", label=f"{r['name']} ({r['kind']})")
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out bits per byte")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def compare(model_configs: list[str], overrides: list[str], output: str, budget_flops: float = 0.0,
            budget_bytes: float = 0.0, curve_points: int = 4, perturb: list[str] = (), seed: int = 0) -> list[dict]:
    perturbations = [Perturbation.parse(spec) for spec in perturb]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan(model_configs, overrides, out, budget_flops, budget_bytes, curve_points)
    if perturbations and any(p.config.model.kind == "eiw" for p in plans):
        raise UserError("--perturb changes text, and an eiw model reads compressed windows; compare it without")
    results = run(plans, perturbations, seed)
    if jax.process_index() == 0:
        budget = f"{budget_flops:.3g} training FLOPs" if budget_flops else f"{budget_bytes:.3g} training bytes"
        table = markdown(results)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "compare.md").write_text(f"Budget: {budget} per model; bits per byte on the held-out documents.\n\n"
                                        + table)
        plot(results, out / "compare.png")
        print(table)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.png'} and {out / 'results.json'}")
    return results
