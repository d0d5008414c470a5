"""Bits per byte: every token of every document scored exactly once, long documents with context."""

import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.pipeline import ToDocument, scoring_batches
from hiermodel.data.sources import DocumentSource
from hiermodel.models import gates
from hiermodel.progress import Progress
from hiermodel.text.words import split_words
from hiermodel.sharding import batch_sharding, process_slice, to_global, to_host
from hiermodel.train.step import cast, target_bytes, token_nats


def make_score_fn(graphdef, compute_dtype: str, mesh, param_shardings, deletion: str = "soft"):
    """jit: (params, batch) -> {"bits": -log2 p of each scored target [B, T]}; a gated model
    (deletion soft or hard) adds "deleted", "gated" and the gate values "gates" [B, N] over its
    gated positions (bytes or words), "overflow", the positions hard deletion meant to keep but
    had no room for, and "computed", the share of positions the layers after the gate run on."""

    def score(params, batch):
        logits, stats = gates.forward(nnx.merge(graphdef, cast(params, compute_dtype)), batch, deletion)
        scores = {"bits": token_nats(logits, batch) / math.log(2.0)}
        if stats is not None:
            scores.update(deleted=stats["valid"] & (stats["kept"] < 0.5), gated=stats["valid"], gates=stats["gates"],
                          overflow=stats.get("overflow", jnp.zeros((), jnp.int32)),
                          computed=stats.get("capacity", jnp.ones((), jnp.float32)))
        return scores

    return jax.jit(score, in_shardings=(param_shardings, batch_sharding(mesh)))


# A language code at the start of a file name: en_alice.txt, de-faust.txt -> en, de.
LANGUAGE = r"(?:^|/)([a-z]{2,3})[_.-][^/]*$"


def language_of(path: str, pattern: str = LANGUAGE) -> str:
    """The value of a JSONL group ("data.jsonl#lang=de"), else the pattern's first group, else the file name."""
    if "#" in path and "=" in path.rsplit("#", 1)[1]:
        return path.rsplit("=", 1)[1]
    match = re.search(pattern, path)
    return match.group(1) if match else Path(path).name


def text_counts(document: bytes, max_word_bytes: int) -> tuple[int, int]:
    """(characters, words): UTF-8 characters (bytes that do not continue one; an invalid byte
    counts as one), and the HAT splitter's words, which also separate CJK text without spaces."""
    array = np.frombuffer(document, np.uint8)
    return int(((array & 0xC0) != 0x80).sum()), len(split_words(document, max_word_bytes))


def _summary(bits: float, n_bytes: int, tokens: int, chars: int | None, words: int | None) -> dict:
    summary = {"bytes": int(n_bytes), "bits": float(bits), "bpb": bits / n_bytes if n_bytes else math.nan,
               "tokens": int(tokens), "bytes_per_token": n_bytes / tokens if tokens else math.nan}
    if chars is not None:
        summary.update(chars=int(chars), words=int(words), bits_per_char=bits / chars if chars else math.nan,
                       word_perplexity=2.0 ** (bits / words) if words else math.nan)
    return summary


def score_source(score_fn, params, source: DocumentSource, to_document: ToDocument,
                 data: DataConfig, batch_size: int, mesh, max_rows: int = 0, progress: bool = False,
                 language_pattern: str = LANGUAGE, text: bool = True) -> dict:
    """Bits per byte (`bpb`, `bits`, `bytes`) and bytes per token over `source`, overall,
    `per_source` and `per_language`; when every document is scored (max_rows 0) and documents
    are text (`text`; compressed window records are not) also bits per character and word-level
    perplexity.

    Bytes are those the scored tokens cover; a perturbed source (with a `clean` source) is
    measured in its clean documents' bytes, characters and words, so models stay comparable.
    """
    files = len(source.paths)
    bits, counts, tokens = np.zeros(files), np.zeros(files, np.int64), np.zeros(files, np.int64)
    gated, deleted, overflow, computed = np.zeros(files, np.int64), np.zeros(files, np.int64), 0, 1.0
    clean = getattr(source, "clean", source)
    # A holdout split's share of the files is only known once read.
    expected = clean.nbytes if text and clean.split == "all" else None
    meter = Progress(expected, "scored") if progress and jax.process_index() == 0 else None
    steady_since, steady_bytes = None, 0  # throughput from the second batch on: no compilation
    for batch in scoring_batches(data, source, to_document, batch_size, max_rows):
        scores = score_fn(params, to_global(process_slice(batch), mesh))
        bits_BxT = to_host(scores["bits"])
        if steady_since is None:
            steady_since = time.monotonic()
        else:
            steady_bytes += int(target_bytes(batch).sum())
        if "gated" in scores:
            gated_BxN, deleted_BxN = to_host(scores["gated"]), to_host(scores["deleted"])
            position_tags_BxN = _position_tags(batch, gated_BxN.shape[1])
            gated += np.bincount(position_tags_BxN[gated_BxN], minlength=files)
            deleted += np.bincount(position_tags_BxN[deleted_BxN], minlength=files)
            overflow += int(to_host(scores["overflow"]))
            computed = float(to_host(scores["computed"]))
        scored = batch["loss_mask"] > 0
        tags = batch["tags"][scored]
        bits += np.bincount(tags, weights=bits_BxT[scored].astype(np.float64), minlength=files)
        counts += np.bincount(tags, weights=np.asarray(target_bytes(batch))[scored], minlength=files).astype(np.int64)
        tokens += np.bincount(tags, minlength=files)
        if meter:
            meter(int(counts.sum()))
    finished = time.monotonic()
    if meter:
        meter.close()
    chars = words = [None] * files
    if text and not max_rows:
        clean = getattr(source, "clean", source)
        # Pieces are cut at line ends, where words end, so counting them piece by piece is exact.
        totals = np.zeros((files, 3), np.int64)
        for f in range(files):
            for piece in clean.pieces(f):
                totals[f] += (len(piece.data), *text_counts(piece.data, data.max_word_bytes))
        if clean is not source:
            counts = totals[:, 0]
        chars, words = totals[:, 1].tolist(), totals[:, 2].tolist()
    per_source = [{"path": path, **_summary(b, n, k, c, w)}
                  for path, b, n, k, c, w in zip(source.paths, bits, counts, tokens, chars, words)]
    if gated.any():
        for entry, g, d in zip(per_source, gated, deleted):
            entry.update(gated_positions=int(g), deleted_positions=int(d))
    languages: dict[str, list] = {}
    for entry in per_source:
        group = languages.setdefault(language_of(entry["path"], language_pattern), [])
        group.append(entry)
    with_text = chars[0] is not None if files else False

    def total(entries) -> dict:
        add = lambda key: sum(e[key] for e in entries)
        summary = _summary(add("bits"), add("bytes"), add("tokens"), add("chars") if with_text else None,
                           add("words") if with_text else None)
        if gated.any():
            summary["deletion_rate"] = add("deleted_positions") / max(add("gated_positions"), 1)
        return summary

    result = {**total(per_source), "per_source": per_source,
              "per_language": {name: total(entries) for name, entries in sorted(languages.items())}}
    if gated.any():
        # What the layers after the gate compute per row, as a share of its positions.
        result["overflow_rate"], result["positions_after_gate"] = overflow / gated.sum(), computed
    if steady_bytes:
        result["bytes_per_s"] = steady_bytes / (finished - steady_since)
    return result


def _position_tags(batch: dict, positions: int) -> np.ndarray:
    """The source file of each gated position [B, N]: tokens' tags, or for words (HAT) the tag of
    their bytes."""
    if positions == batch["tags"].shape[1]:
        return batch["tags"]
    tags_BxW = np.zeros((batch["tags"].shape[0], positions + 1), batch["tags"].dtype)
    np.put_along_axis(tags_BxW, np.minimum(batch["words"], positions), batch["tags"], axis=1)
    return tags_BxW[:, :positions]
