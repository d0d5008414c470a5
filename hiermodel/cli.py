"""hiermodel train | eval | generate | info."""

import argparse
import json
import sys
from pathlib import Path

from hiermodel.errors import UserError

USAGE_ERROR = 2


def _load_run(run_dir: str):
    """(config, mesh, graphdef, params) of a run's latest checkpoint, on all local devices."""
    from hiermodel import config as config_lib
    from hiermodel.models.registry import check_kind
    from hiermodel.train import state as state_lib
    from hiermodel.train.checkpoint import open_run
    from hiermodel.train.sharding import make_mesh

    checkpointer, step, saved = open_run(run_dir)
    config = config_lib.from_dict(saved, f"{run_dir} checkpoint {step} config")
    check_kind(config.model)
    mesh = make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1))
    graphdef, abstract = state_lib.abstract_params(config, mesh)
    try:
        params = checkpointer.restore_params(step, abstract)
    except (ValueError, KeyError) as e:
        reason = str(e).splitlines()[0][:200]
        raise UserError(f"{run_dir}: checkpoint {step} does not hold this model's parameters ({reason})") from None
    checkpointer.close()
    return config, mesh, graphdef, params


def cmd_train(args) -> int:
    from hiermodel import config as config_lib
    from hiermodel.train.loop import TrainingDiverged, train

    config = config_lib.load(args.config, args.overrides)
    try:
        train(config)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    import jax

    from hiermodel.data.sources import DocumentSource
    from hiermodel.eval.score import make_score_fn, score_source

    config, mesh, graphdef, params = _load_run(args.checkpoint)
    source = DocumentSource(args.data, config.data.separator, config.data.jsonl_field)
    with jax.set_mesh(mesh):
        shardings = jax.tree.map(lambda p: p.sharding, params)
        score_fn = make_score_fn(graphdef, config.model.compute_dtype, mesh, shardings)
        batch_size = args.batch_size or max(jax.device_count(), 8)
        result = score_source(score_fn, params, source, config.data, batch_size, mesh, progress=True)
    if jax.process_index() == 0:
        width = max(len(s["path"]) for s in result["per_source"])
        print(f"{'source':<{width}}  {'bytes':>12}  {'bpb':>7}")
        for s in result["per_source"]:
            print(f"{s['path']:<{width}}  {s['bytes']:>12,}  {s['bpb']:>7.4f}")
        print(f"{'total':<{width}}  {result['bytes']:>12,}  {result['bpb']:>7.4f}")
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(
                {"bpb": result["bpb"], "bytes": result["bytes"], "per_source": result["per_source"]}, indent=2))
    return 0


def cmd_generate(args) -> int:
    import jax

    from hiermodel.eval.generate import generate

    if args.max_bytes < 1:
        raise UserError("--max-bytes must be at least 1")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    config, mesh, graphdef, params = _load_run(args.checkpoint)
    prompt = args.prompt.encode("utf-8", errors="surrogateescape")
    out = sys.stdout.buffer
    out.write(prompt)
    out.flush()

    def show(byte: int):
        out.write(bytes([byte]))
        out.flush()

    with jax.set_mesh(mesh):
        generate(graphdef, params, prompt, args.max_bytes, config.data, config.model.compute_dtype,
                 args.temperature, args.top_p, args.seed, on_byte=show)
    out.write(b"\n")
    return 0


def cmd_info(args) -> int:
    from hiermodel import config as config_lib
    from hiermodel.models.registry import check_kind
    from hiermodel.train.state import num_params

    config = config_lib.load(args.config, args.overrides)
    check_kind(config.model)
    print(f"{args.config}: model.kind={config.model.kind}, {num_params(config):,} parameters")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiermodel", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train or resume a run")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 run_dir=runs/x")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("eval", help="bits per byte of a checkpoint on text")
    evaluate.add_argument("--checkpoint", required=True, help="run directory")
    evaluate.add_argument("--data", required=True, nargs="+", help="files, directories, globs, JSONL")
    evaluate.add_argument("--output-json", help="write the results here")
    evaluate.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: 8)")
    evaluate.set_defaults(run=cmd_eval)

    gen = sub.add_parser("generate", help="sample a continuation of a prompt")
    gen.add_argument("--checkpoint", required=True, help="run directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-bytes", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=cmd_generate)

    info = sub.add_parser("info", help="build a config's model abstractly and count its parameters")
    info.add_argument("config")
    info.add_argument("overrides", nargs="*")
    info.set_defaults(run=cmd_info)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax and grain are chatty at INFO/WARNING
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
