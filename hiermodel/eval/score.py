"""Bits per byte: every token of every document scored exactly once, long documents with context."""

import math
import sys
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.documents import Document
from hiermodel.data.pipeline import scoring_batches
from hiermodel.data.sources import DocumentSource
from hiermodel.train.sharding import batch_sharding, process_slice, to_global, to_host
from hiermodel.train.step import cast, target_bytes, token_nats


def make_score_fn(graphdef, compute_dtype: str, mesh, param_shardings):
    """jit: (params, batch) -> -log2 p of each scored target, [B, T]."""

    def score(params, batch):
        logits = nnx.merge(graphdef, cast(params, compute_dtype))(batch)
        return token_nats(logits, batch) / math.log(2.0)

    return jax.jit(score, in_shardings=(param_shardings, batch_sharding(mesh)))


def score_source(score_fn, params, source: DocumentSource, to_document: Callable[[bytes], Document],
                 data: DataConfig, batch_size: int, mesh, max_rows: int = 0, progress: bool = False) -> dict:
    """{"bpb", "bits", "bytes", "per_source": [{"path", "bytes", "bits", "bpb"}]} over `source`.

    Bytes are those the scored tokens cover; a source may report its documents' clean sizes
    instead (`clean_bytes`, for perturbed text), so bits per byte stay comparable.
    """
    files = len(source.paths)
    bits, counts = np.zeros(files), np.zeros(files, np.int64)
    started, rows = time.monotonic(), 0
    for batch in scoring_batches(data, source, to_document, batch_size, max_rows):
        bits_BxT = to_host(score_fn(params, to_global(process_slice(batch), mesh)))
        scored = batch["loss_mask"] > 0
        tags = batch["tags"][scored]
        bits += np.bincount(tags, weights=bits_BxT[scored].astype(np.float64), minlength=files)
        counts += np.bincount(tags, weights=np.asarray(target_bytes(batch))[scored], minlength=files).astype(np.int64)
        rows += batch_size
        if progress and jax.process_index() == 0 and (sys.stderr.isatty() or rows % (20 * batch_size) == 0):
            elapsed = time.monotonic() - started
            print(f"scored {counts.sum():,} bytes in {elapsed:.0f}s ({counts.sum() / max(elapsed, 1e-9) / 1e3:.1f} KB/s)",
                  end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)
    if progress and jax.process_index() == 0 and sys.stderr.isatty():
        print(file=sys.stderr)
    if hasattr(source, "clean_bytes"):
        counts = np.array([source.clean_bytes(f) for f in range(files)], np.int64)
    per_source = [
        {"path": path, "bytes": int(n), "bits": float(b), "bpb": float(b / n) if n else float("nan")}
        for path, n, b in zip(source.paths, counts, bits)
    ]
    total_bits, total_bytes = float(bits.sum()), int(counts.sum())
    return {"bpb": total_bits / max(total_bytes, 1), "bits": total_bits, "bytes": total_bytes,
            "per_source": per_source}
