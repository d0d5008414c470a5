"""Writing documents to ArrayRecord shards (one record = one document's bytes)."""

import os
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter

from hiermodel.data.sources import DocumentSource


def write_shards(source: DocumentSource, output_dir: str | Path, num_shards: int) -> tuple[list[Path], int]:
    """Documents in order, round-robin over shards, and how many; each shard is written under a
    temporary name and renamed when complete, so an interrupted run never leaves a truncated shard."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"documents-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    partial = [p.with_name(p.name + ".partial") for p in paths]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in partial]
    count = 0
    try:
        for count, document in enumerate(source.documents(), 1):
            writers[(count - 1) % num_shards].write(document)
    finally:
        for writer in writers:
            writer.close()
    for tmp, final in zip(partial, paths):
        os.replace(tmp, final)
    return paths, count
