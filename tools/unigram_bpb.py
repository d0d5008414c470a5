"""How much a tokenizer knows before any training: bits per byte of a unigram model (token
frequencies of the training split, add-one smoothed) on the held-out split, for raw bytes and
for a BPE.

    python tools/unigram_bpb.py CONFIG [--tokenizer BPE.json] [key=value ...]

The data come from the config (data.train, data.eval, data.holdout, data.chunk_bytes) exactly as
training and evaluation read them. A subword model reaches its unigram figure within a few
steps (it is what its output bias learns first); a byte-level model starts from the byte figure.
"""

import argparse
import collections
import math
import sys
from typing import Callable, Iterable


def unigram_bpb(train: Iterable[bytes], held_out: Iterable[bytes], tokens: Callable[[bytes], list[int]],
                vocab_size: int) -> float:
    """Bits per byte on `held_out` of add-one-smoothed token frequencies counted on `train`."""
    counts = collections.Counter()
    for document in train:
        counts.update(tokens(document))
    total = sum(counts.values()) + vocab_size
    bits = n_bytes = 0
    for document in held_out:
        n_bytes += len(document)
        bits -= sum(math.log2((counts[t] + 1) / total) for t in tokens(document))
    return bits / n_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--tokenizer", help="a BPE made by tools/train_tokenizer.py")
    args = p.parse_intermixed_args(argv)

    from hiermodel import config as config_lib
    from hiermodel.data.documents import SubwordEncoding
    from hiermodel.data.sources import open_split
    from hiermodel.errors import UserError
    from hiermodel.text.subword import Subword

    try:
        config = config_lib.load(args.config, args.overrides)
        train, held_out = open_split(config.data, "train"), open_split(config.data, "eval")
        documents = lambda source: source.documents()
        results = {"bytes": unigram_bpb(documents(train), documents(held_out), list, 256)}
        if args.tokenizer:
            bpe = SubwordEncoding(Subword.load(args.tokenizer), config.data.max_word_bytes)
            ids = lambda d: bpe.document(d).tokens[1:].tolist()
            results[f"BPE {bpe.vocab_size}"] = unigram_bpb(documents(train), documents(held_out), ids, bpe.vocab_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, bpb in results.items():
        print(f"unigram over {name}: {bpb:.4f} bits per held-out byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
