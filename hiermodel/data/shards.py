"""Writing documents to ArrayRecord shards (one record = one document's bytes)."""

import os
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter

from hiermodel.data.sources import DocumentSource


def write_shards(source: DocumentSource, output_dir: str | Path, num_shards: int) -> list[Path]:
    """Documents in order, round-robin over shards; each shard is written under a temporary
    name and renamed when complete, so an interrupted run never leaves a truncated shard."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"documents-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    partial = [p.with_name(p.name + ".partial") for p in paths]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in partial]
    try:
        for index in range(len(source)):
            writers[index % num_shards].write(source[index])
    finally:
        for writer in writers:
            writer.close()
    for tmp, final in zip(partial, paths):
        os.replace(tmp, final)
    return paths
