"""Generation throughput: bytes/s of sampling with and without caches, model against model.

    python tools/bench_generate.py runs/tiny runs/tiny_byte --prompt-file ../shared/corpus/en_pride_and_prejudice.txt

Each argument is a run directory (its latest checkpoint) or a config (fresh weights: fine for
models whose speed does not depend on what they generate, not for HAT, whose backbone runs once
per generated word). Every model samples --bytes bytes after the same prompts (--batch rows, row
r prompted with --prompt-bytes of the file from the r-th line on, cut at a line end), cached and
uncached (--modes); the figure is all rows' bytes over the best of --repeats timed runs after one
untimed run that compiles. With --forced, byte-level models take the file's bytes after each
prompt instead of sampling: the same work per byte on real text, so fresh weights time HAT at
the word lengths of real text.
"""

import argparse
import json
import sys
import time


def load(spec: str, overrides: list[str] = ()):
    """(config, graphdef, params) of a run directory or a config with fresh weights (and `overrides`)."""
    from pathlib import Path

    from flax import nnx

    from hiermodel import run
    from hiermodel import config as config_lib
    from hiermodel.models.registry import build

    if Path(spec).is_dir():
        config, _, graphdef, params = run.load_params(spec)
        return config, graphdef, params
    config = config_lib.load(spec, list(overrides))
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(config.seed)))
    return config, graphdef, nnx.to_pure_dict(params)


def prompts_from(text: bytes, count: int, size: int) -> list[tuple[int, bytes]]:
    """`count` (offset, prompt) of about `size` bytes, from successive line starts, cut at a line end."""
    starts = [0] + [i + 1 for i, byte in enumerate(text) if byte == ord("\n")]
    prompts = []
    for start in starts[:count]:
        piece = text[start:start + size]
        prompts.append((start, piece[:piece.rfind(b"\n") + 1] or piece))
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run directories or configs")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--prompt-bytes", type=int, default=400)
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--batch", type=int, default=1, help="prompts sampled together")
    p.add_argument("--modes", default="cached,uncached")
    p.add_argument("--forced", action="store_true", help="continue with the file's bytes instead of sampling")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the models given as configs (e.g. model.compute_dtype=float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from hiermodel.run import encoding
    from hiermodel.eval.generate import Sampling, generate
    from hiermodel.train.state import num_params

    text = open(args.prompt_file, "rb").read()
    starts = prompts_from(text, args.batch, args.prompt_bytes)
    prompts = [prompt for _, prompt in starts]
    # Each prompt's continuation in the file.
    forced = [text[at + len(p):at + len(p) + args.bytes] for at, p in starts] if args.forced else None
    results = []
    for spec in args.models:
        config, graphdef, params = load(spec, args.set)
        for name in args.modes.split(","):
            sample = lambda: sum(map(len, generate(graphdef, params, encoding(config), prompts, args.bytes, config.data,
                                                   config.model.compute_dtype, Sampling(temperature=1.0),
                                                   cached=name == "cached", forced=forced)))
            sample()  # compiles
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                out = sample()
                best = min(best, time.perf_counter() - started)
            result = {"model": spec, "kind": config.model.kind, "params": num_params(config), "mode": name,
                      "batch": args.batch, "bytes": out, "seconds": best, "bytes_per_s": out / best}
            results.append(result)
            print(f"{spec} ({config.model.kind}, {result['params']:,} parameters) {name}: "
                  f"{result['bytes_per_s']:.1f} bytes/s ({out} bytes in {best:.2f}s, {args.batch} rows)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
