"""Resumable sharded output: shard i is complete iff `shard_{i:05d}.parquet` exists.

Each shard is written to a hidden temporary file and renamed, so a killed job leaves only
complete shards; the same command run again skips them and continues. Under torchrun, rank r
handles shards r, r + W, r + 2W, ...
"""

from __future__ import annotations

import os
from pathlib import Path


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:05d}.parquet"


def pending_shards(directory: Path, num_shards: int, rank: int = 0, world: int = 1) -> list[int]:
    return [i for i in range(rank, num_shards, world) if not shard_path(directory, i).is_file()]


def write_shard(directory: Path, index: int, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    final = shard_path(directory, index)
    tmp = final.with_name(f".{final.name}.tmp")
    # from_pylist takes its columns from the first row alone: give every row every column
    # (None where absent), or a labelled row after an unlabelled one would lose its pair.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{key: row.get(key) for key in columns} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(final)
    return final


def read_shards(directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(Path(directory).glob("shard_*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
