"""Generation throughput: bytes/s of sampling with and without caches, model against model.

    python tools/bench_generate.py runs/tiny runs/tiny_byte --prompt-file ../shared/corpus/en_pride_and_prejudice.txt

Each argument is a run directory (its latest checkpoint) or a config (fresh weights: fine for
models whose speed does not depend on what they generate, not for HAT, whose backbone runs once
per generated word). Every model samples --bytes bytes after the same prompt (the first
--prompt-bytes of the file, cut at a line end), cached and uncached; the figure is the best of
--repeats timed runs after one untimed run that compiles.
"""

import argparse
import json
import sys
import time


def load(spec: str):
    """(config, graphdef, params) of a run directory or a config with fresh weights."""
    from pathlib import Path

    from flax import nnx

    from hiermodel import cli
    from hiermodel import config as config_lib
    from hiermodel.models.registry import build

    if Path(spec).is_dir():
        config, _, graphdef, params = cli._load_run(spec)
        return config, graphdef, params
    config = config_lib.load(spec)
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(config.seed)))
    return config, graphdef, nnx.to_pure_dict(params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run directories or configs")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--prompt-bytes", type=int, default=400)
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from hiermodel.data.documents import encoding
    from hiermodel.eval.generate import Sampling, generate, generate_cached, generate_hat_cached
    from hiermodel.train.state import num_params

    text = open(args.prompt_file, "rb").read()[:args.prompt_bytes]
    prompt = text[:text.rfind(b"\n") + 1] or text
    results = []
    for spec in args.models:
        config, graphdef, params = load(spec)
        cached = generate_hat_cached if config.model.kind == "hat" else generate_cached
        for name, run in (("cached", cached), ("uncached", generate)):
            sample = lambda: run(graphdef, params, encoding(config), prompt, args.bytes, config.data,
                                 config.model.compute_dtype, Sampling(temperature=1.0))
            sample()  # compiles
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                out = sample()
                best = min(best, time.perf_counter() - started)
            result = {"model": spec, "kind": config.model.kind, "params": num_params(config), "mode": name,
                      "bytes": len(out), "seconds": best, "bytes_per_s": len(out) / best}
            results.append(result)
            print(f"{spec} ({config.model.kind}, {result['params']:,} parameters) {name}: "
                  f"{result['bytes_per_s']:.1f} bytes/s ({len(out)} bytes in {best:.2f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
