"""Train the subword baseline's byte-level BPE on text and save it for `model.tokenizer`.

    python tools/train_tokenizer.py --vocab-size 4096 --output runs/bpe4096.json DATA...

DATA are files, directories, globs, JSONL or builtin:SPLIT, read as training data is.
"""

import argparse
import sys
import time
from pathlib import Path

from hiermodel.data.sources import DocumentSource
from hiermodel.errors import UserError
from hiermodel.text import subword


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="+")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all, BOS and the 256 bytes included")
    p.add_argument("--output", required=True, help="tokenizer file to write (JSON)")
    p.add_argument("--max-word-bytes", type=int, default=100, help="as data.max_word_bytes of the runs using it")
    p.add_argument("--separator", default="", help="as data.separator")
    p.add_argument("--jsonl-field", default="text", help="as data.jsonl_field")
    args = p.parse_args(argv)
    try:
        source = DocumentSource(args.data, args.separator, args.jsonl_field)
        started = time.monotonic()
        print(f"training a {args.vocab_size}-id BPE on {source.nbytes:,} bytes of {len(source.paths)} files",
              file=sys.stderr)
        tokenizer = subword.train(source.documents(), args.vocab_size, args.max_word_bytes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(output)
    print(f"wrote {output}: {tokenizer.vocab_size} ids in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
