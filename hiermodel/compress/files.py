"""Compressing documents into window shards with M1, and back (hiermodel compress / decompress).

A shard directory holds ArrayRecord shards of window records (document i is record i // n of
shard i % n) and summary.json: the counts, M1's FLOPs per byte, and the fingerprint of the
integer M1 that coded them. M1's integers live in its run directory (m1_integer.npz, made once),
so compressor and decompressor always use the very same model.
"""

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from hiermodel import storage
from hiermodel.compress import windows
from hiermodel.compress.integer_lm import IntegerLM, IntegerPredictor
from hiermodel.data import window_records
from hiermodel.errors import UserError
from hiermodel.progress import Progress
from hiermodel.run import INTEGER_M1_FILE



def integer_m1(run_dir: str) -> IntegerLM:
    """The run's integer M1: quantised and saved on first use, loaded after that."""
    path = str(storage.path(run_dir) / INTEGER_M1_FILE)
    if not storage.path(path).exists():
        model = IntegerLM.from_run(run_dir)
        with tempfile.TemporaryDirectory() as local:
            model.save(os.path.join(local, INTEGER_M1_FILE))
            storage.write_atomically(path, Path(local, INTEGER_M1_FILE).read_bytes())
    return IntegerLM.load(path)


def compress(m1_run: str, documents: Sequence[bytes], output: str | Path, window_bits: int = 16,
             num_shards: int = 1, batch_size: int = 512, segment_bytes: int = 512, devices=None) -> dict:
    """Code `documents` into window shards in `output`; returns the summary it writes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    model = integer_m1(m1_run)
    output = storage.path(output)
    output.mkdir(parents=True, exist_ok=True)
    total = sum(map(len, documents))
    started = time.monotonic()
    predictor = IntegerPredictor(model, devices)
    progress = Progress(total, "compressed")
    records = windows.encode_documents(predictor, documents, window_bits, batch_size, segment_bytes, progress)
    progress.close()
    m1_positions = predictor.positions + 1  # and BOS, once
    seconds = time.monotonic() - started
    paths = [output / f"windows-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    # Shards are written on local disk (ArrayRecord writes no object store) and then moved into
    # place whole, so an interrupted run never leaves a truncated shard.
    with tempfile.TemporaryDirectory() as local:
        written = [os.path.join(local, p.name) for p in paths]
        writers = [ArrayRecordWriter(name, "group_size:1") for name in written]
        try:
            for index, record in enumerate(records):
                writers[index % num_shards].write(window_records.pack(record))
        finally:
            for writer in writers:
                writer.close()
        for name, final in zip(written, paths):
            storage.upload(name, f"{final}.partial")
            storage.path(f"{final}.partial").replace(final)
    summary = windows.summarize(records, window_bits)
    result = {"documents": len(documents), "bytes_in": summary.bytes_in, "windows_out": summary.windows_out,
              "bytes_per_window": summary.bytes_per_window, "bits_per_byte": summary.bits_per_byte,
              "window_bits": window_bits, "shards": [p.name for p in paths], "m1_run": str(m1_run),
              "m1_fingerprint": model.fingerprint(), "m1_positions": m1_positions,
              "m1_flops_per_byte": m1_positions * model.shape.position_flops() / max(total, 1),
              "seconds": seconds, "bytes_per_s": total / max(seconds, 1e-9)}
    (output / window_records.SUMMARY_FILE).write_text(json.dumps(result, indent=2))
    return result


def read_records(shard_dir: str | Path) -> tuple[dict, list[window_records.WindowRecord]]:
    """The summary and every document's window record, in the order they were compressed."""
    from grain.sources import ArrayRecordDataSource

    shard_dir = storage.path(shard_dir)
    summary = window_records.read_summary(str(shard_dir))
    sources = []
    for name in summary["shards"]:
        if not (shard_dir / name).exists():
            raise UserError(f"{shard_dir / name}: missing (listed in {window_records.SUMMARY_FILE})")
        sources.append(ArrayRecordDataSource([str(shard_dir / name)]))
    n = len(sources)
    records = [window_records.unpack(sources[i % n][i // n], f"{shard_dir / summary['shards'][i % n]} record {i // n}")
               for i in range(summary["documents"])]
    return summary, records


def decompress(m1_run: str, shard_dir: str | Path, batch_size: int = 512, devices=None) -> tuple[dict, list[bytes]]:
    """(summary with the decoding time, every document's bytes); an undecodable window or an M1
    other than the one that compressed is an error naming it."""
    summary, records = read_records(shard_dir)
    model = integer_m1(m1_run)
    if model.fingerprint() != summary["m1_fingerprint"]:
        raise UserError(f"{m1_run}: its integer M1 ({model.fingerprint()[:12]}) is not the one that compressed "
                        f"{shard_dir} ({summary['m1_fingerprint'][:12]}, from {summary['m1_run']})")
    started = time.monotonic()
    progress = Progress(summary["bytes_in"], "decompressed")
    decoded = windows.decode_documents(IntegerPredictor(model, devices), [r.windows for r in records],
                                       summary["window_bits"], batch_size, progress)
    progress.close()
    documents = windows.require_decodable(decoded)
    seconds = time.monotonic() - started
    return {**summary, "decode_seconds": seconds, "decode_bytes_per_s": summary["bytes_in"] / max(seconds, 1e-9)}, documents
