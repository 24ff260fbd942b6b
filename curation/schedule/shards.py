"""A round's results, shard by shard: each shard's candidates and counts from the round's scored rows,
and whether its rejects say the whole file is unusable."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import storage
from core.errors import ConfigError
from core.reader import (
    REJECT_BAD_JSON,
    REJECT_MISSING_TEXT_COLUMN,
    REJECT_NON_UTF8,
    REJECT_TRUNCATED_STREAM,
    REJECT_UNREADABLE,
)
from core.storage import StorageOptions
from curation.selection.rules import SelectionSettings, block_candidates

# Reasons that condemn a whole file: it cannot be opened, has no text column, or breaks partway.
FILE_FAILURES = (REJECT_UNREADABLE, REJECT_MISSING_TEXT_COLUMN, REJECT_TRUNCATED_STREAM)
# Line reasons that, when they are most of a file, mean it is not JSONL at all.
NOT_JSONL = (REJECT_BAD_JSON, REJECT_NON_UTF8)


def shard_of(source: str) -> str:
    """A row's shard URI from its `source` (`uri#line` or the bare URI)."""
    return source.rsplit("#", 1)[0]


def shard_failure(rejects: pa.Table, documents: int, max_bad_line_fraction: float) -> str | None:
    """Why a read shard is unusable, or None. `rejects` has the reader's `reason` and `detail` columns.

    A whole-file reject (unreadable, no text column, a compressed stream that breaks) fails it; so does a
    file whose lines are mostly not JSON objects (not JSONL at all).
    """
    reasons = rejects.column("reason").to_pylist()
    details = rejects.column("detail").to_pylist()
    for reason, detail in zip(reasons, details, strict=True):
        if reason in FILE_FAILURES:
            return f"{reason}: {detail}"
    bad = [detail for reason, detail in zip(reasons, details, strict=True) if reason in NOT_JSONL]
    lines = documents + len(reasons)
    if bad and len(bad) / lines > max_bad_line_fraction:
        return f"not JSONL: {len(bad)} of {lines} lines are not JSON objects (first: {bad[0]})"
    return None


def _keep_candidates(table: pa.Table, selection: SelectionSettings) -> pa.Table:
    """The rows of `table` (one shard's scored rows) that are candidates under the rule."""
    ids = table.column("id").to_numpy(zero_copy_only=False)
    sources = table.column("source").to_numpy(zero_copy_only=False)
    sims = np.stack(table.column("seed_sims").to_numpy(zero_copy_only=False)) if table.num_rows else None
    if sims is None:
        return table
    chosen = block_candidates(ids, sources, sims, selection)
    wanted = set(zip(chosen.column("id").to_pylist(), chosen.column("source").to_pylist(), strict=True))
    mask = [pair in wanted for pair in zip(ids.tolist(), sources.tolist(), strict=True)]
    return table.filter(pa.array(mask, type=pa.bool_()))


def shard_candidates(
    scored_dir: str, options: StorageOptions, selection: SelectionSettings
) -> tuple[dict[str, pa.Table], dict[str, int], dict[str, int]]:
    """Per shard: its candidate rows, documents scored, tokens; reduced file by file, never all at once."""
    candidates: dict[str, pa.Table] = {}
    documents: dict[str, int] = {}
    tokens: dict[str, int] = {}
    try:
        files = [info.uri for info in storage.expand(scored_dir, options, config_field="scored_dir")]
    except ConfigError:
        return candidates, documents, tokens  # nothing was scored: every shard was empty or rejected
    for uri in files:
        if not uri.endswith(".parquet"):
            continue
        table = storage.read_parquet(uri, options)
        shards = pa.array([shard_of(source) for source in table.column("source").to_pylist()], type=pa.string())
        for shard in pc.unique(shards).to_pylist():
            part = table.filter(pc.equal(shards, shard))
            documents[shard] = documents.get(shard, 0) + part.num_rows
            tokens[shard] = tokens.get(shard, 0) + int(pc.sum(part.column("n_tokens")).as_py() or 0)
            if shard in candidates:
                part = pa.concat_tables([candidates[shard], part], promote_options="default")
            candidates[shard] = _keep_candidates(part, selection)
    return candidates, documents, tokens


def value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    """How often each value occurs in `column`."""
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(column).to_pylist()}
