"""Input pipeline and training cost against document size: one markdown table, one run.

    python tools/bench_documents.py CORPUS_DIR [--work DIR] [--batches N] [--steps N] [--rows NAME,...]

Builds, from the text files in CORPUS_DIR (repeated as needed, written under --work, never into
the repository), corpora of 1 KB, 64 KB and 2 MB documents (one per file), one 100 MB document,
and a 1 GB JSONL file of mixed line lengths (100 B to 4 MB). For each it measures, each command a
process of its own: tools/bench_pipeline.py's MB/s and peak RSS; a tiny-config training run of
--steps steps that also evaluates 16 rows of the same data (peak RSS, wall time); and resuming
that run for one more step against a fresh run of one step (both with a warm compilation cache,
so the difference is restoring).
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def corpus_text(corpus: Path) -> bytes:
    files = sorted(corpus.glob("*.txt"))
    if not files:
        sys.exit(f"error: {corpus}: no .txt files")
    return b"\n".join(f.read_bytes() for f in files)


def cut_documents(text: bytes, size: int, total: int) -> list[bytes]:
    """`total` bytes of `text` (repeated) in documents of about `size`, cut after a line end."""
    ring = text * (size // len(text) + 1) + text
    documents, at, written = [], 0, 0
    while written < total:
        piece = ring[at:at + size]
        cut = piece.rfind(b"\n", size - 256) + 1 or size
        documents.append(piece[:cut])
        written += cut
        at = (at + cut) % len(text)
    return documents


def build(text: bytes, work: Path, rows: list[str]) -> dict[str, str]:
    """The data.train value of each row, writing what is missing."""
    specs = {}
    for name, size in (("1 KB documents", 1 << 10), ("64 KB documents", 1 << 16), ("2 MB documents", 2 * MB)):
        folder = work / name.split()[0].replace(" ", "")
        if name in rows and not folder.exists():
            folder.mkdir(parents=True)
            for i, document in enumerate(cut_documents(text, size, 16 * MB)):
                (folder / f"doc{i:06d}.txt").write_bytes(document)
        specs[name] = str(folder)
    single = work / "single_100MB.txt"
    if "one 100 MB document" in rows and not single.exists():
        single.write_bytes((text * (100 * MB // len(text) + 1))[:100 * MB])
    specs["one 100 MB document"] = str(single)
    mixed = work / "mixed_1GB.jsonl"
    if "1 GB JSONL, mixed sizes" in rows and not mixed.exists():
        rng, written, at = random.Random(0), 0, 0
        repeated = text.decode("utf-8", errors="replace") * 3
        with open(mixed.with_suffix(".partial"), "w") as f:
            while written < 1024 * MB:
                size = int(10 ** rng.uniform(2, 6.6))  # 100 B to 4 MB, log-uniform
                at = (at + size) % (len(repeated) // 2)
                line = json.dumps({"text": repeated[at:at + size]}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
        mixed.with_suffix(".partial").rename(mixed)
    specs["1 GB JSONL, mixed sizes"] = str(mixed)
    return {name: spec for name, spec in specs.items() if name in rows}


def measure(command: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, output) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024, output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/hiermodel-bench-documents"))
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", default="1 KB documents,64 KB documents,2 MB documents,one 100 MB document,"
                                     "1 GB JSONL, mixed sizes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    args = p.parse_args(argv)
    rows = [r.strip() for r in re.split(r",(?! mixed)", args.rows)]
    args.work.mkdir(parents=True, exist_ok=True)
    specs = build(corpus_text(args.corpus), args.work, rows)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(args.work / "jax-cache"), "JAX_PLATFORMS": "cpu"}
    python, config = sys.executable, "configs/tiny.yaml"
    print("| data | pipeline MB/s | pipeline peak RSS (MB) | tiny train, "
          f"{args.steps} steps: peak RSS (MB) | wall (s) | resume 1 step (s) | fresh 1 step (s) | resume / fresh |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in specs.items():
        common = [f"data.train={spec}", f"data.eval={spec}", *args.set]
        _, pipeline_rss, output = measure([python, "tools/bench_pipeline.py", config, *common,
                                           "--batches", str(args.batches)], env)
        rate = float(re.search(r"([\d.]+) MB/s", output).group(1))
        run = args.work / "runs" / re.sub(r"\W+", "_", name)
        fresh = args.work / "runs" / "fresh"
        subprocess.run(["rm", "-rf", str(run), str(fresh)], check=True)
        # Training evaluates too (a sample of 16 rows, read in order from the start of the data).
        train = [python, "-m", "hiermodel.cli", "train", config, *common, "train.log_every=10",
                 f"train.eval_every={args.steps}", "train.eval_rows=16"]
        wall, train_rss, _ = measure([*train, f"run_dir={run}", f"train.steps={args.steps}",
                                      f"train.checkpoint_every={args.steps}"], env)
        resume, _, _ = measure([*train, f"run_dir={run}", f"train.steps={args.steps + 1}"], env)
        start, _, _ = measure([*train, f"run_dir={fresh}", "train.steps=1"], env)
        print(f"| {name} | {rate:.2f} | {pipeline_rss:,.0f} | {train_rss:,.0f} | {wall:.1f} | {resume:.1f} | "
              f"{start:.1f} | {resume / start:.2f} |", flush=True)


if __name__ == "__main__":
    main()
