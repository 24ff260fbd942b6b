"""Builders for small corpora with planted documents, shared by pipeline and job tests."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

SEEDS = [
    {"domain": "maths", "text": "prime numbers and integers and the proof of a theorem"},
    {"domain": "maths", "text": "w10 w11 w12 w13 w14 w15 integers proof"},
    {"domain": "body", "text": "the heart pumps blood and cells divide in the body"},
    {"domain": "body", "text": "w40 w41 w42 w43 w44 w45 heart blood"},
]


def planted(seed_text: str, variant: int) -> str:
    """A document made to resemble a seed: the seed's words with one neutral word appended."""
    return f"{seed_text} w{150 + variant}"


def background(rng: random.Random) -> str:
    """A document unlike every seed: random words from a range no seed uses."""
    return " ".join(f"w{rng.randrange(60, 140)}" for _ in range(rng.randrange(6, 30)))


def write_corpus(root: Path, shards: int = 3, background_docs: int = 60, bad_rows: bool = True) -> dict:
    """Gzipped JSONL shards: background docs, two planted docs per seed, and (optionally) bad rows.

    Returns {"planted": {text: domain}, "seeds": path of the seeds file, "good_rows": count, "bad": {reason: n}}.
    """
    rng = random.Random(7)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[bytes] = []
    planted_texts: dict[str, str] = {}
    for index, seed in enumerate(SEEDS):
        for variant in range(2):
            text = planted(seed["text"], 2 * index + variant)
            planted_texts[text] = seed["domain"]
            rows.append(json.dumps({"text": text, "meta": {"kind": "planted"}}).encode())
    for _ in range(background_docs):
        rows.append(json.dumps({"text": background(rng), "meta": {"kind": "background"}}).encode())
    rng.shuffle(rows)
    bad = {}
    if bad_rows:
        rows += [b"{not json", json.dumps({"meta": {}}).encode(), json.dumps({"text": "  "}).encode()]
        bad = {"bad_json": 1, "missing_text": 1, "empty": 1}
    for shard in range(shards):
        payload = b"".join(row + b"\n" for row in rows[shard::shards])
        (root / f"part-{shard}.jsonl.gz").write_bytes(gzip.compress(payload))
    seeds_path = root.parent / "seeds.jsonl"
    seeds_path.write_text("".join(json.dumps(seed) + "\n" for seed in SEEDS))
    good = len(rows) - sum(bad.values())
    return {"planted": planted_texts, "seeds": str(seeds_path), "good_rows": good, "bad": bad}
