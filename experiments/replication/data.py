"""The replication's data steps: held-out sets and pool, the arms' training documents, and their rewrites.

- `holdout`: from the packaged labelled corpus, a held-out set per domain (documents whose `meta.topic` is
  the domain's) and a general one (all topics), drawn before anything is curated; the pool every arm draws
  from is taken from what is left: up to `pool_topic_docs` documents of each domain's topic (Mathematics
  has 256 in all), filled up to `pool` with documents of the other topics. No curator chose a held-out
  document and no arm can train on one.
- `arm`: one arm's training documents, `budget` of them: FineScope's best-scored for the domain, a seeded
  random draw from the pool, or the oracle's (a seeded draw of the pool's topic-labelled documents).
- `union`: every arm's documents, each once, so the teacher rewrites each document once for all arms.
- `select`: one arm's rows of the distilled union, trained on the teacher's rewrite, or on the original
  text for the arm that measures what distillation is worth.

Each step writes its rows under `OUT/rows/` and a manifest, and skips itself when its config and inputs
are unchanged, like every stage.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import manifest, storage
from core.errors import ConfigError
from core.reader import doc_id
from core.runtime import RunConfig
from core.stage import FilesPlan, Outcome, Stage, run_stage
from curation import demo_corpus

ROWS = "rows"
POOL = "pool"
POOL_INDEX = "pool.parquet"
HELDOUT = "heldout"
GENERAL = "general"
POOL_SHARDS = 8


def _write_rows(table: pa.Table, out: str, options: storage.StorageOptions) -> None:
    storage.write_parquet_atomic(table, storage.join(out, ROWS, "part-00000.parquet"), options)


@dataclass
class HoldoutConfig(RunConfig):
    """Set the held-out documents aside and write the pool the arms draw from."""

    out: str = ""
    topics: dict[str, str] = field(default_factory=dict)
    """Domain -> the `meta.topic` of its documents."""
    pool: int = 4000
    pool_topic_docs: int = 200
    """At most this many documents of each domain's topic in the pool; other topics fill it up to `pool`."""
    heldout: int = 60
    general: int = 120
    seed: int = 0


def _labelled_rows(seed: int) -> list[dict[str, Any]]:
    """The packaged summaries in a seeded order, each with its content id (the one curation gives it)."""
    rows = demo_corpus.load_summaries()
    random.Random(seed).shuffle(rows)
    seen: set[str] = set()
    unique = []
    for row in rows:
        row["id"] = doc_id(row["text"].strip())
        if row["id"] not in seen:
            seen.add(row["id"])
            unique.append(row)
    return unique


def split_labelled(config: HoldoutConfig) -> tuple[dict[str, list[dict]], list[dict]]:
    """(held-out rows per domain and `general`, pool rows): disjoint, drawn in one seeded order."""
    rows = _labelled_rows(config.seed)
    sets: dict[str, list[dict]] = {}
    taken: set[str] = set()
    for domain, topic in config.topics.items():
        sets[domain] = _of_topic(rows, topic)[: config.heldout]
        if len(sets[domain]) < config.heldout:
            hint = f"fewer than heldout={config.heldout}; lower `heldout` or check the topic's name"
            raise ConfigError(f"domains.{domain}", topic, f"labels {len(sets[domain])} documents of the corpus, {hint}")
        taken.update(row["id"] for row in sets[domain])
    sets[GENERAL] = [row for row in rows if row["id"] not in taken][: config.general]
    taken.update(row["id"] for row in sets[GENERAL])
    rest = [row for row in rows if row["id"] not in taken]
    pool = [row for topic in config.topics.values() for row in _of_topic(rest, topic)[: config.pool_topic_docs]]
    others = [row for row in rest if row["meta"]["topic"] not in set(config.topics.values())]
    if len(pool) + len(others) < config.pool:
        raise ConfigError("pool", config.pool, f"only {len(pool) + len(others)} documents can fill it; lower it")
    pool += others[: config.pool - len(pool)]
    random.Random(config.seed).shuffle(pool)
    return sets, pool


def _of_topic(rows: list[dict], topic: str) -> list[dict]:
    return [row for row in rows if row["meta"]["topic"] == topic]


def _plan_holdout(config: HoldoutConfig) -> FilesPlan:
    source = demo_corpus.summaries_path()
    inputs = [storage.FileInfo(str(source), source.stat().st_size, source.stat().st_mtime)]
    return FilesPlan(inputs, config.digest(inputs))


def _holdout(config: HoldoutConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    sets, pool = split_labelled(config)
    for name, rows in sets.items():
        redpajama = [{"text": row["text"], "meta": row["meta"]} for row in rows]
        demo_corpus.write_shards(storage.join(config.out, HELDOUT, name), redpajama, 1, options, prefix=HELDOUT)
    demo_corpus.write_shards(storage.join(config.out, POOL), [{"text": r["text"], "meta": r["meta"]} for r in pool],
                             POOL_SHARDS, options)  # fmt: skip
    index = pa.table({name: [row[name] if name != "topic" else row["meta"]["topic"] for row in pool]
                      for name in ("id", "text", "topic")})  # fmt: skip
    storage.write_parquet_atomic(index, storage.join(config.out, POOL_INDEX), options)
    counts = {
        "pool": len(pool),
        "heldout": {name: len(rows) for name, rows in sets.items()},
        "pool_topics": dict(sorted(Counter(row["meta"]["topic"] for row in pool).items())),
    }
    return Outcome(counts)


HOLDOUT: Stage[HoldoutConfig, FilesPlan] = Stage("holdout", _plan_holdout, _holdout, uses_ray=False)


def run_holdout(config: HoldoutConfig) -> dict[str, Any]:
    return run_stage(HOLDOUT, config)


def pool_glob(holdout_out: str) -> str:
    return storage.join(holdout_out, POOL, "*.jsonl.gz")


def heldout_glob(holdout_out: str, name: str) -> str:
    return storage.join(holdout_out, HELDOUT, name, "*.jsonl.gz")


def rows_dir(out: str) -> str:
    return storage.join(out, ROWS)


ArmKind = Literal["finescope", "random", "oracle"]


@dataclass
class ArmConfig(RunConfig):
    """One arm's training documents: `budget` of them, drawn as `kind` says."""

    out: str = ""
    kind: ArmKind = "finescope"
    holdout: str = ""
    """The holdout step's output (its pool)."""
    curated: str | None = None
    """For `finescope`: a curate output whose rule kept `budget` documents per domain."""
    domain: str | None = None
    topic: str | None = None
    budget: int = 150
    seed: int = 0


def _draw(rows: pa.Table, budget: int, seed: int, what: str) -> pa.Table:
    if rows.num_rows < budget:
        raise ConfigError("pool", rows.num_rows, f"holds {rows.num_rows} {what}, fewer than budget={budget}; "
                          "raise `pool` or lower `budget`")  # fmt: skip
    rows = rows.sort_by("id")  # the draw must not depend on the order the rows were read in
    return rows.take(pa.array(np.sort(np.random.default_rng(seed).choice(rows.num_rows, budget, replace=False))))


def _finescope_rows(config: ArmConfig, pool: pa.Table, options: storage.StorageOptions) -> pa.Table:
    curated = storage.read_parquet(storage.join(config.curated, "curated"), options, columns=["id", "domain", "score"])
    mine = curated.filter(pc.equal(curated.column("domain"), config.domain))
    if mine.num_rows < config.budget:
        hint = f"fewer than budget={config.budget}; curate with rule global_topn and top_n=budget"
        raise ConfigError(
            "curate.top_n", mine.num_rows, f"{config.domain} has {mine.num_rows} curated documents, {hint}"
        )
    best = mine.sort_by([("score", "descending"), ("id", "ascending")]).slice(0, config.budget)
    wanted = set(best.column("id").to_pylist())
    return pool.filter(pa.array([i in wanted for i in pool.column("id").to_pylist()]))


def _plan_arm(config: ArmConfig) -> FilesPlan:
    index = storage.join(config.holdout, POOL_INDEX)
    curated = [storage.join(config.curated, "curated")] if config.curated else []
    inputs = storage.expand([index, *curated], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def _arm(config: ArmConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    pool = storage.read_parquet(storage.join(config.holdout, POOL_INDEX), options)
    if config.kind == "finescope":
        rows = _finescope_rows(config, pool, options)
    elif config.kind == "oracle":
        rows = _draw(pool.filter(pc.equal(pool.column("topic"), config.topic)), config.budget, config.seed,
                     f"documents of topic {config.topic!r}")  # fmt: skip
    else:
        rows = _draw(pool, config.budget, config.seed, "documents")
    rows = rows.sort_by("id")
    rows = rows.append_column("domain", pa.array([config.domain or "random"] * rows.num_rows, pa.string()))
    _write_rows(rows, config.out, options)
    counts: dict[str, Any] = {"rows": rows.num_rows}
    if config.topic:
        counts["on_topic"] = sum(t == config.topic for t in rows.column("topic").to_pylist())
    return Outcome(counts)


ARM: Stage[ArmConfig, FilesPlan] = Stage(
    "arm", _plan_arm, _arm, reads=lambda config: [config.holdout, config.curated or ""], uses_ray=False
)


def run_arm(config: ArmConfig) -> dict[str, Any]:
    return run_stage(ARM, config)


@dataclass
class UnionConfig(RunConfig):
    """Every arm's documents, each once: the teacher's input."""

    out: str = ""
    arms: list[str] = field(default_factory=list)
    """Arm outputs (their rows/ are read)."""


def _plan_union(config: UnionConfig) -> FilesPlan:
    inputs = storage.expand([rows_dir(arm) for arm in config.arms], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def _union(config: UnionConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    tables = [storage.read_parquet(rows_dir(arm), options, columns=["id", "text"]) for arm in config.arms]
    everything = pa.concat_tables(tables).sort_by("id")
    ids = everything.column("id").to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    union = everything.filter(pa.array(first))
    _write_rows(union, config.out, options)
    return Outcome({"rows": union.num_rows, "arm_rows": everything.num_rows})


UNION: Stage[UnionConfig, FilesPlan] = Stage("union", _plan_union, _union, reads=lambda c: c.arms, uses_ray=False)


def run_union(config: UnionConfig) -> dict[str, Any]:
    return run_stage(UNION, config)


@dataclass
class SelectConfig(RunConfig):
    """One arm's rows of the distilled union, with the target it trains on."""

    out: str = ""
    arm: str = ""
    distilled: str = ""
    """The distill step's output (its distilled/ is read)."""
    target: Literal["teacher", "original"] = "teacher"
    """`teacher`: the rewrite where the distiller accepted it (else the original); `original`: the raw text
    that follows the same prompt, for the arm that measures what distillation is worth."""


def _plan_select(config: SelectConfig) -> FilesPlan:
    distilled_dir = storage.join(config.distilled, "distilled")
    inputs = storage.expand([rows_dir(config.arm), distilled_dir], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def _select(config: SelectConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    distilled_dir = storage.join(config.distilled, "distilled")
    wanted = set(storage.read_parquet(rows_dir(config.arm), options, columns=["id"]).column("id").to_pylist())
    distilled = storage.read_parquet(distilled_dir, options)
    rows = distilled.filter(pa.array([i in wanted for i in distilled.column("id").to_pylist()])).sort_by("id")
    if config.target == "original":
        at = rows.schema.get_field_index("response")
        rows = rows.set_column(at, "response", rows.column("original"))
    _write_rows(rows, config.out, options)
    accepted = int(pc.sum(rows.column("accepted")).as_py() or 0)
    return Outcome({"rows": rows.num_rows, "accepted": accepted, "not_distilled": len(wanted) - rows.num_rows})


SELECT: Stage[SelectConfig, FilesPlan] = Stage(
    "select", _plan_select, _select, reads=lambda config: [config.arm, config.distilled], uses_ray=False
)


def run_select(config: SelectConfig) -> dict[str, Any]:
    return run_stage(SELECT, config)
