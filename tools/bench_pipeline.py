"""Throughput of the input pipeline alone (split, pack, batch), in bytes of text per second.

    python tools/bench_pipeline.py [CONFIG] [key=value ...] [--batches N]
"""

import argparse
import time

import numpy as np

from hiermodel import config as config_lib
from hiermodel.run import encoding
from hiermodel.data.pipeline import train_dataset
from hiermodel.data.sources import open_train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/tiny.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_intermixed_args(argv)
    config = config_lib.load(args.config, args.overrides)
    encoder = encoding(config)
    source = open_train(config.data, encoder.reads_text)
    iterator = iter(train_dataset(config.data, source, encoder.document, config.seed, config.train.batch_size))
    next(iterator)  # start the prefetch thread
    text_bytes = slots = positions = 0
    started = time.perf_counter()
    for _ in range(args.batches):
        batch = next(iterator)
        text_bytes += int(batch["token_bytes"].sum())
        slots += int((batch["segments"] > 0).sum())
        positions += batch["segments"].size
    elapsed = time.perf_counter() - started
    iterator.close()
    print(f"{args.batches} batches of {config.train.batch_size} x {config.data.row_tokens} tokens: "
          f"{text_bytes / elapsed / 1e6:.2f} MB/s of text, row fill {slots / positions:.1%}, "
          f"{np.mean(batch['word_segments'] > 0):.1%} of word slots used")


if __name__ == "__main__":
    main()
