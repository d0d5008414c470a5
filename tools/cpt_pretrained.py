"""Continued pretraining from a pretrained start (BENCHMARKS.md): an English subword model trained
here, exported to the Hugging Face layout, then continued on 90% German / 10% English both as
itself (imported back) and as the frozen-then-unfrozen backbone of a HAT. Prints the table.

    python tools/cpt_pretrained.py [--stage1-steps 400] [--levels 2.6,2.4,2.3]

Each step is skipped when its output exists, so an interrupted study picks up where it stopped.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from hiermodel.text.pretrained_tokenizer import load as load_tokenizer
from hiermodel.train.metrics import read_metrics

TOKENIZER = "runs/bpe4096_en.json"
SUBWORD_EN, EXPORTED, IMPORTED = "runs/cpt_subword_en", "runs/cpt_llama_en", "runs/cpt_imported_en"
SUBWORD_DE, HAT_FROZEN, HAT = "runs/cpt_pretrained_subword_de", "runs/cpt_pretrained_hat_frozen", "runs/cpt_pretrained_hat"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def done(run_dir: str, steps: int) -> bool:
    metrics = Path(run_dir) / "metrics.jsonl"
    return metrics.exists() and steps in read_metrics(run_dir)


def evals(run_dir: str, offset: int = 0) -> list[tuple[int, dict]]:
    return [(step + offset, record) for step, record in sorted(read_metrics(run_dir, "eval").items())]


def bytes_per_token(language: str) -> float:
    """Bytes per token of the English model's tokenizer on the first 100 KB of each of a language's files."""
    tokenizer = load_tokenizer(Path(IMPORTED) / "tokenizer.json")
    data = b"".join(path.read_bytes()[:100_000] for path in sorted(Path("../shared/corpus").glob(f"{language}_*.txt")))
    return len(data) / len(tokenizer.encode_document(data, 100)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--levels", default="2.6,2.4,2.3", help="German bits per byte to report the first step at")
    args = parser.parse_args()
    cli = ["-m", "hiermodel.cli"]
    if not Path(TOKENIZER).exists():
        run("tools/train_tokenizer.py", "../shared/corpus/en_*.txt", "--vocab-size", "4096", "--output", TOKENIZER)
    if not done(SUBWORD_EN, args.stage1_steps):
        run(*cli, "train", "configs/cpt_subword_en.yaml", f"train.steps={args.stage1_steps}")
    if not Path(EXPORTED).exists():
        run(*cli, "export", "--checkpoint", SUBWORD_EN, "--output", EXPORTED)
    if not Path(IMPORTED).exists():
        run(*cli, "import", EXPORTED, IMPORTED, "--row-tokens", "320")
    if not done(SUBWORD_DE, 300):
        run(*cli, "train", "configs/cpt_pretrained_subword_de.yaml", "train.eval_every=25")
    if not done(HAT_FROZEN, 100):
        run(*cli, "train", "configs/cpt_pretrained_hat_frozen.yaml", "train.eval_every=25")
    if not done(HAT, 200):
        run(*cli, "train", "configs/cpt_pretrained_hat.yaml", "train.eval_every=25")

    before = evals(SUBWORD_EN)[-1][1]
    subword = evals(SUBWORD_DE)
    hat = evals(HAT_FROZEN) + evals(HAT, offset=100)
    levels = [float(x) for x in args.levels.split(",")]
    reach = lambda points, level: next((str(s) for s, r in points if r["bpb_de"] <= level), "not in 300")
    last_train = lambda run_dir: read_metrics(run_dir)[max(read_metrics(run_dir))]
    flops = {"subword": last_train(SUBWORD_DE)["train_flops"],
             "hat": last_train(HAT_FROZEN)["train_flops"] + last_train(HAT)["train_flops"]}
    rows = [
        ("German / English bits per byte before (the English model, as exported)",
         f"{before['bpb_de']:.3f} / {before['bpb_en']:.3f}", "byte parts untrained"),
        ("German / English at the first evaluation (step 25)",
         f"{subword[0][1]['bpb_de']:.3f} / {subword[0][1]['bpb_en']:.3f}",
         f"{hat[0][1]['bpb_de']:.3f} / {hat[0][1]['bpb_en']:.3f}"),
        *[(f"first step at German {level} bits per byte", reach(subword, level), reach(hat, level)) for level in levels],
        ("German / English after 300 steps", f"{subword[-1][1]['bpb_de']:.3f} / {subword[-1][1]['bpb_en']:.3f}",
         f"{hat[-1][1]['bpb_de']:.3f} / {hat[-1][1]['bpb_en']:.3f}"),
        ("English change over the 300 steps", f"{subword[-1][1]['bpb_en'] - before['bpb_en']:+.3f}",
         f"{hat[-1][1]['bpb_en'] - hat[0][1]['bpb_en']:+.3f} (from step 25)"),
        ("training FLOPs (hardware count)", f"{flops['subword']:.3g}", f"{flops['hat']:.3g}"),
        ("bytes per token, English / German", f"{bytes_per_token('en'):.2f} / {bytes_per_token('de'):.2f}", "1 / 1"),
    ]
    print("| | subword, continued as itself | HAT on its layers (100 frozen + 200) |\n| --- | --- | --- |")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
