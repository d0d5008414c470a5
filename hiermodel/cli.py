"""hiermodel train | eval | generate | compare | compress | decompress | import | export | info | config."""

import argparse
import json
import sys

from hiermodel import storage
from hiermodel.errors import UserError

USAGE_ERROR = 2


def cmd_train(args) -> int:
    from hiermodel import config as config_lib
    from hiermodel.train.distributed import initialize
    from hiermodel.train.loop import TrainingDiverged, train

    config = config_lib.load(args.config, args.overrides)
    initialize(config.distributed)
    try:
        train(config)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    import jax

    from hiermodel.data.sources import DocumentSource, open_split
    from hiermodel.eval.perturb import Perturbation, PerturbedSource
    from hiermodel.eval.score import LANGUAGE, make_score_fn, score_source
    from hiermodel.run import encoding, load_params

    perturbations = [Perturbation.parse(spec) for spec in args.perturb]
    config, mesh, graphdef, params = load_params(args.checkpoint)
    encoder = encoding(config)
    if perturbations and not encoder.reads_text:
        raise UserError(f"{args.checkpoint}: --perturb changes text, and an eiw model reads compressed windows; "
                        "compress perturbed text with hiermodel compress instead")
    source = open_split(config.data, "eval", args.data, args.group_field, encoder.reads_text) if args.held_out \
        else DocumentSource(args.data, config.data.separator, config.data.jsonl_field, config.data.chunk_bytes,
                            config.data.read_bytes, encoder.reads_text, group_field=args.group_field)
    with jax.set_mesh(mesh):
        shardings = jax.tree.map(lambda p: p.sharding, params)
        score_fn = make_score_fn(graphdef, config.model.compute_dtype, mesh, shardings, args.deletion)
        batch_size = args.batch_size or max(jax.device_count(), 8)
        score = lambda docs: score_source(score_fn, params, docs, encoder.document, config.data, batch_size, mesh,
                                          progress=True, language_pattern=args.language_pattern or LANGUAGE,
                                          text=encoder.reads_text)
        result = score(source)
        result["perturbations"] = {}
        for perturbation in perturbations:
            noisy = score(PerturbedSource(source, perturbation, args.perturb_seed))
            noisy["degradation"] = noisy["bpb"] - result["bpb"]
            result["perturbations"][str(perturbation)] = noisy
    if jax.process_index() == 0:
        rows = [(s["path"], s) for s in result["per_source"]]
        if len(result["per_language"]) > 1:
            rows += [(f"language {name}", entry) for name, entry in result["per_language"].items()]
        rows.append(("total", result))
        width = max(len(name) for name, _ in rows)
        print(f"{'source':<{width}}  {'bytes':>12}  {'bpb':>7}  {'bits/char':>9}  {'word ppl':>10}")
        for name, entry in rows:
            per_text = (f"{entry['bits_per_char']:>9.4f}  {entry['word_perplexity']:>10.2f}" if "bits_per_char" in entry
                        else f"{'-':>9}  {'-':>10}")
            print(f"{name:<{width}}  {entry['bytes']:>12,}  {entry['bpb']:>7.4f}  {per_text}")
        if "overflow_rate" in result:
            by_language = "".join(f", {name} {entry['deletion_rate']:.1%}"
                                  for name, entry in result["per_language"].items())
            print(f"{args.deletion} deletion: {result['deletion_rate']:.1%} of gated positions deleted{by_language}; "
                  f"overflow {result['overflow_rate']:.2%}; the layers after the gate ran on "
                  f"{result['positions_after_gate']:.1%} of the positions")
        for name, noisy in result["perturbations"].items():
            print(f"{'perturbed ' + name:<{width}}  {noisy['bytes']:>12,}  {noisy['bpb']:>7.4f}  "
                  f"({noisy['degradation']:+.4f} bpb, against the clean bytes)")
        if args.output_json:
            storage.write_atomically(args.output_json, json.dumps(result, indent=2).encode())
    return 0


def cmd_generate(args) -> int:
    import jax

    from hiermodel.eval.generate import Sampling, generate
    from hiermodel.progress import Progress
    from hiermodel.run import encoding, load_params

    if args.max_bytes < 1:
        raise UserError("--max-bytes must be at least 1")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.top_k < 0:
        raise UserError("--top-k must be 0 (off) or positive")
    config, mesh, graphdef, params = load_params(args.checkpoint)
    encoder = encoding(config)
    prompts = [p.encode("utf-8", errors="surrogateescape") for p in args.prompt]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    out = sys.stdout.buffer

    def show(row: int, piece: bytes):  # one prompt streams; several print when all are done
        out.write(piece)
        out.flush()

    if len(prompts) == 1:
        out.write(prompts[0])
        out.flush()
        on_bytes = show
    else:  # several prompts print when all are done; meanwhile a bar counts their bytes
        meter, sampled = Progress(args.max_bytes * len(prompts), "sampled"), [0]

        def on_bytes(row: int, piece: bytes):
            sampled[0] += len(piece)
            meter(sampled[0])
    with jax.set_mesh(mesh):
        if config.model.kind == "eiw":
            texts = _generate_windows(args, config, graphdef, params, encoder, prompts, sampling, on_bytes)
        else:
            texts = generate(graphdef, params, encoder, prompts, args.max_bytes, config.data,
                             config.model.compute_dtype, sampling, on_bytes=on_bytes, cached=not args.no_cache)
    if len(prompts) > 1:
        meter.close()
        out.write(b"\n\n".join(prompt + text for prompt, text in zip(prompts, texts)))
    out.write(b"\n")
    return 0


def _generate_windows(args, config, graphdef, params, encoding, prompts, sampling, on_bytes) -> list[bytes]:
    """An eiw run's samples, decoded by its M1; undecodable windows are reported on stderr."""
    from hiermodel.compress.files import integer_m1
    from hiermodel.compress.integer_lm import IntegerPredictor
    from hiermodel.eval.generate import generate_windows

    if args.no_cache:
        raise UserError(f"{args.checkpoint}: an eiw model generates with its cache only; drop --no-cache")
    if not config.model.m1:
        raise UserError(f"{args.checkpoint}: model.m1 is empty, so there is no M1 to decode its windows with")
    samples = generate_windows(graphdef, params, encoding, IntegerPredictor(integer_m1(config.model.m1)), prompts,
                               args.max_bytes, config.data, config.model.compute_dtype, sampling, on_bytes)
    for row, sample in enumerate(samples):
        if sample.undecodable:
            shown = ", ".join(map(str, sample.undecodable[:10])) + (", ..." if len(sample.undecodable) > 10 else "")
            print(f"\nprompt {row + 1}: {len(sample.undecodable)} of {len(sample.codewords)} sampled windows decode to no "
                  f"text under M1 ({config.model.m1}) and add nothing: windows {shown}", file=sys.stderr)
    return [sample.text for sample in samples]


def cmd_compare(args) -> int:
    from hiermodel.eval.compare import compare

    compare(args.models, args.overrides, args.output, args.budget_flops, args.budget_bytes, args.curve_points,
            args.perturb, args.perturb_seed)
    return 0


def cmd_config(args) -> int:
    import yaml

    from hiermodel import config as config_lib

    config = config_lib.load(args.config, args.overrides)
    print(f"# {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else "") + ": every key, resolved")
    print(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False), end="")
    return 0


def cmd_info(args) -> int:
    from hiermodel import config as config_lib
    from hiermodel.models.pretrained import with_backbone_from
    from hiermodel.models.registry import check_kind, forward_flops, train_flops
    from hiermodel.train.state import num_params

    config = config_lib.load(args.config, args.overrides)
    config.model = with_backbone_from(config.model)
    check_kind(config.model)
    shape = (config.model, config.data.row_tokens, config.data.row_words)
    print(f"{args.config}: model.kind={config.model.kind}, {num_params(config):,} parameters, "
          f"{train_flops(*shape) / config.data.row_tokens:.4g} training and "
          f"{forward_flops(*shape) / config.data.row_tokens:.4g} inference FLOPs per token of a full row")
    m = config.model
    print(f"backbone{' from ' + m.backbone_from if m.backbone_from else ''}: {m.backbone_layers} layers, width "
          f"{m.backbone_dim}, {m.backbone_heads} heads ({m.backbone_kv_heads} key/value), MLP {m.backbone_mlp_dim}, "
          f"RoPE theta {m.rope_theta:g}" + (f" scaled x{m.rope_scaling.factor:g}" if m.rope_scaling.factor else "")
          + (", query/key/value biases" if m.attention_bias else "") + (", tied embeddings" if m.tie_embeddings else ""))
    return 0


def cmd_import(args) -> int:
    from hiermodel.convert import import_checkpoint

    config = import_checkpoint(args.source, args.run_dir, args.row_tokens)
    model = config.model
    print(f"{args.source} -> {args.run_dir}: model.kind=subword, {model.backbone_layers} layers of width "
          f"{model.backbone_dim}, {model.backbone_heads} heads ({model.backbone_kv_heads} key/value), "
          f"{model.vocab_size:,} ids; score it with hiermodel eval --checkpoint {args.run_dir}, continue it "
          f"with init_from={args.run_dir}")
    return 0


def cmd_export(args) -> int:
    from hiermodel.convert import export_run

    export_run(args.checkpoint, args.output)
    print(f"{args.checkpoint} -> {args.output}: config.json, model.safetensors, tokenizer.json (LlamaForCausalLM)")
    return 0


def _documents(args) -> list[bytes]:
    """The documents of `compress`: all of INPUT, or one side of its holdout split."""
    from hiermodel.config import DataConfig
    from hiermodel.data.sources import DocumentSource, open_split

    if args.split == "all":
        source = DocumentSource(args.inputs, args.separator, args.jsonl_field, args.chunk_bytes)
    else:
        if args.holdout <= 0:
            raise UserError(f"--split {args.split} needs --holdout > 0")
        data = DataConfig(separator=args.separator, jsonl_field=args.jsonl_field, chunk_bytes=args.chunk_bytes,
                          holdout=args.holdout)
        source = open_split(data, args.split, args.inputs)
    return list(source.documents())


def cmd_compress(args) -> int:
    from hiermodel.compress.files import compress

    if args.shards < 1 or args.batch_size < 1 or args.segment_bytes < 1:
        raise UserError("--shards, --batch-size and --segment-bytes must be positive")
    summary = compress(args.m1, _documents(args), args.output, args.window_bits, args.shards, args.batch_size,
                       args.segment_bytes)
    print(f"{summary['documents']:,} documents, {summary['bytes_in']:,} bytes in, {summary['windows_out']:,} "
          f"{summary['window_bits']}-bit windows out: {summary['bytes_per_window']:.3f} bytes per window, "
          f"{summary['bits_per_byte']:.4f} bits per byte; {summary['bytes_per_s'] / 1e3:.1f} KB/s -> {args.output}")
    return 0


def cmd_decompress(args) -> int:
    from hiermodel.compress.files import decompress

    summary, documents = decompress(args.m1, args.input, args.batch_size)
    storage.write_atomically(args.output, b"".join(documents))
    print(f"{len(documents):,} documents, {summary['bytes_in']:,} bytes restored from {summary['windows_out']:,} "
          f"windows; {summary['decode_bytes_per_s'] / 1e3:.1f} KB/s -> {args.output}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth showing."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    from hiermodel import __version__

    p = argparse.ArgumentParser(prog="hiermodel", description=__doc__)
    p.add_argument("--version", action="version", version=f"hiermodel {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    command = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)

    train = command("train", help="train or resume a run",
                    description="Train a run, or resume it from its latest checkpoint in run_dir. Every config key "
                                "and its value: hiermodel config CONFIG; what each means: hiermodel/config.py.")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 run_dir=runs/x")
    train.set_defaults(run=cmd_train)

    evaluate = command("eval", help="bits per byte of a checkpoint on text")
    evaluate.add_argument("--checkpoint", required=True, help="run directory")
    evaluate.add_argument("--data", required=True, nargs="+", help="files, directories, globs, JSONL")
    evaluate.add_argument("--output-json", help="write the results here")
    evaluate.add_argument("--batch-size", type=int, default=0, help="rows per batch; 0: 8 or the device count if larger")
    evaluate.add_argument("--perturb", action="append", default=[], metavar="KIND:RATE",
                          help="also score seeded noisy text (swap, drop, insert, case, whitespace; "
                               "repeatable), in bits per clean byte")
    evaluate.add_argument("--perturb-seed", type=int, default=0, help="seed of the --perturb noise")
    evaluate.add_argument("--deletion", choices=("hard", "soft"), default="hard",
                          help="a gated model: drop deleted positions (inference) or weight them (training)")
    evaluate.add_argument("--language-pattern",
                          help="regex whose first group is a path's language (default: a code starting "
                               "the file name, en_alice.txt -> en)")
    evaluate.add_argument("--group-field", default="",
                          help="JSONL: report per value of this field (e.g. lang) as sources and languages")
    evaluate.add_argument("--held-out", action="store_true",
                          help="score only the documents the run's data.holdout kept out of training")
    evaluate.set_defaults(run=cmd_eval)

    gen = command("generate", help="sample a continuation of a prompt")
    gen.add_argument("--checkpoint", required=True, help="run directory")
    gen.add_argument("--prompt", required=True, action="append",
                     help="repeat for several prompts, sampled together as a batch (row r with seed + r)")
    gen.add_argument("--no-cache", action="store_true",
                     help="re-run the model on the whole context for every token instead of using caches")
    gen.add_argument("--max-bytes", type=int, default=200, help="bytes to sample after each prompt")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: always the likeliest token")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (0: all)")
    gen.add_argument("--top-p", type=float, default=0.95, help="sample among the likeliest tokens that make up this "
                     "much probability")
    gen.add_argument("--seed", type=int, default=0, help="seed of row 0; row r uses seed + r")
    gen.set_defaults(run=cmd_generate)

    comp = command("compare", help="train several configs at a matched budget and tabulate bits per byte")
    comp.add_argument("--models", nargs="+", required=True, help="model configs, e.g. configs/tiny.yaml "
                      "configs/tiny_byte.yaml configs/tiny_subword.yaml")
    comp.add_argument("overrides", nargs="*", help="key=value applied to every model, e.g. data.train=DIR")
    comp.add_argument("--output", required=True, help="directory for the runs, compare.md, compare.png")
    comp.add_argument("--budget-flops", type=float, default=0.0, help="training FLOPs per model")
    comp.add_argument("--budget-bytes", type=float, default=0.0, help="training bytes per model")
    comp.add_argument("--curve-points", type=int, default=4, help="evaluations along each run, for the plot")
    comp.add_argument("--perturb", action="append", default=[], metavar="KIND:RATE",
                      help="also report each model's degradation under this noise (repeatable)")
    comp.add_argument("--perturb-seed", type=int, default=0, help="seed of the --perturb noise")
    comp.set_defaults(run=cmd_compare)

    packer = command("compress", help="code documents into Equal-Info-Window shards with an M1 byte model")
    packer.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories, globs, JSONL")
    packer.add_argument("--m1", required=True, help="run directory of a byte model (model.kind=byte)")
    packer.add_argument("--output", required=True, help="directory for the shards and summary.json")
    packer.add_argument("--window-bits", type=int, default=16, help="bits per window, 16 to 32")
    packer.add_argument("--shards", type=int, default=1, help="ArrayRecord files to spread the documents over")
    packer.add_argument("--batch-size", type=int, default=512, help="rows coded at once")
    packer.add_argument("--segment-bytes", type=int, default=512,
                        help="documents are coded in independent pieces of at most this many bytes")
    packer.add_argument("--separator", default="", help="split text files into documents on this string")
    packer.add_argument("--jsonl-field", default="text", help="JSONL inputs: the field that holds the text")
    packer.add_argument("--chunk-bytes", type=int, default=0, help="cut documents at line ends into pieces of at most this")
    packer.add_argument("--holdout", type=float, default=0.0, help="as data.holdout: the share held out by content hash")
    packer.add_argument("--split", choices=("all", "train", "eval"), default="all",
                        help="with --holdout, compress only that side (the same documents as a run's data split)")
    packer.set_defaults(run=cmd_compress)

    decomp = command("decompress", help="restore the bytes of Equal-Info-Window shards exactly")
    decomp.add_argument("input", metavar="DIR", help="a directory written by hiermodel compress")
    decomp.add_argument("--m1", required=True, help="the M1 run directory that compressed it")
    decomp.add_argument("--output", required=True, help="file for the documents' bytes, in order")
    decomp.add_argument("--batch-size", type=int, default=512, help="rows decoded at once")
    decomp.set_defaults(run=cmd_decompress)

    importer = command("import", help="make a subword run of a Hugging Face Llama-family checkpoint on disk",
                       description="Read a local checkpoint directory (config.json, *.safetensors, tokenizer.json: "
                                   "Llama 2/3/3.1/3.2, Mistral, Qwen2) into a run directory that eval and generate "
                                   "read and init_from continues. Nothing is downloaded. A HAT takes a checkpoint's "
                                   "layers as its backbone with model.backbone_from=DIR instead.")
    importer.add_argument("source", help="the checkpoint's directory")
    importer.add_argument("run_dir", help="a new run directory")
    importer.add_argument("--row-tokens", type=int, default=1024, help="tokens per row when scoring (data.row_tokens)")
    importer.set_defaults(run=cmd_import)

    exporter = command("export", help="write a subword run as a Hugging Face Llama checkpoint")
    exporter.add_argument("--checkpoint", required=True, help="run directory (model.kind=subword)")
    exporter.add_argument("--output", required=True, help="a new directory")
    exporter.set_defaults(run=cmd_export)

    info = command("info", help="build a config's model abstractly and count its parameters and FLOPs")
    info.add_argument("config", help="YAML config")
    info.add_argument("overrides", nargs="*", help="key=value")
    info.set_defaults(run=cmd_info)

    show = command("config", help="print a config with every key resolved (defaults, base files, overrides)")
    show.add_argument("config", help="YAML config")
    show.add_argument("overrides", nargs="*", help="key=value")
    show.set_defaults(run=cmd_config)
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
