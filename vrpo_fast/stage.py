"""The skeleton of a resumable sharded stage (`sample`, `score`): what is the same for every
stage that turns N input items into Parquet shards of `shard_size` items each.

    provenance: the folder's record must match this run's (else one UserError), or is written
                (also over the record of a run that stopped before writing any shard)
    pending: this rank's shards r, r + W, r + 2W, ... not yet on disk (vrpo_fast.shards)
    announce:   the stage's own header line, with how many of this rank's shards are done
    set-up:     only when something is left (loading a sampler or models costs time)
    write loop: shard i = rows of items [i * shard_size, (i + 1) * shard_size), written
                atomically, then the progress bar advances by its items

A stage supplies only its provenance record, its header and a set-up returning what it
computes per shard, so a killed run re-run with the same command resumes the same way
whichever stage it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vrpo_fast import shards
from vrpo_fast.errors import UserError
from vrpo_fast.provenance import identity_mismatch, read_provenance, write_provenance

# compute(index, lo, hi): the rows of shard `index`, items [lo, hi) of the stage's input.
ShardRows = Callable[[int, int, int], list[dict]]


def started_record(out: Path) -> dict | None:
    """The provenance of the stage's folder `out` when some shard is on disk, else None: a
    run that stopped before its first shard (a refused row, a model that could not read the
    data) left a record of settings nothing was computed with, which the next run replaces."""
    if not any(Path(out).glob("shard_*.parquet")):
        return None
    return read_provenance(out)


def shard_count(num_items: int, shard_size: int) -> int:
    """Shards of `shard_size` items holding `num_items` (the last one may be shorter)."""
    return -(-num_items // shard_size)


def run_sharded_stage(out: Path, record: dict, *, num_items: int, shard_size: int, key: str,
                      holds: str, differs_hint: str, announce: Callable[[int, int], None],
                      setup: Callable[[], ShardRows], progress: bool, desc: str,
                      unit: str) -> Path:
    """Run (or resume) this rank's shards of a stage writing into `out`; returns `out`.

    Args:
        out: the output folder (created by whichever rank starts first).
        record: this run's provenance; an existing folder's record must agree on its identity
            (`provenance.identity_mismatch`), else UserError naming `key` (the output's config
            key), what the folder `holds` ("samples") and `differs_hint`, what such a
            difference usually means. A folder without shards takes this run's record.
        num_items, shard_size: the stage's input size and items per shard.
        announce: announce(done, mine) prints the stage's header: `done` of this rank's
            `mine` shards are on disk already.
        setup: called once, only when shards are pending; returns compute(index, lo, hi),
            the rows of shard `index` (items [lo, hi)).
        progress: show a progress bar of items (`desc`, `unit`; the rank is appended under
            several ranks).
    """
    existing = started_record(out)
    if existing is not None:
        differs = identity_mismatch(existing, record)
        if differs:
            raise UserError(f"{key}: {out} already holds {holds} with another {differs} "
                            f"({differs_hint}); choose a new {key}, or delete the folder to "
                            f"start over")
    rank, world = shards.rank_and_world()
    # Every rank creates the folder and the record (atomically), whichever starts first.
    out.mkdir(parents=True, exist_ok=True)
    if existing is None:
        write_provenance(out, record)
    num_shards = shard_count(num_items, shard_size)
    todo = shards.pending_shards(out, num_shards, rank, world)
    mine = range(rank, num_shards, world)
    announce(len(mine) - len(todo), len(mine))
    if not todo:
        return out
    compute = setup()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        def size(i):
            return min(shard_size, num_items - i * shard_size)

        total = sum(size(i) for i in mine)
        bar = tqdm(total=total, initial=total - sum(size(i) for i in todo),
                   desc=desc + (f" rank {rank}" if world > 1 else ""), unit=unit,
                   dynamic_ncols=True)
    try:
        for index in todo:
            lo, hi = index * shard_size, min((index + 1) * shard_size, num_items)
            rows = compute(index, lo, hi)
            shards.write_shard(out, index, rows)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:     # closed on an error too: its message starts a line of its own
            bar.close()
    return out
