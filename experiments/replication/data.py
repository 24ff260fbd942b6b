"""The replication's data steps: held-out sets and pool, the curators' rankings, the arms' training documents,
and their rewrites.

- `holdout`: from the packaged labelled corpus, first a general held-out set that holds every topic in
  proportion to its share of the corpus (at least one document each, the domains' topics included), then a
  held-out set per domain (documents whose `meta.topic` is the domain's), drawn before anything is curated;
  the pool every arm draws from is taken from what is left: up to `pool_topic_docs` documents of each
  domain's topic, filled up to `pool` with documents of the other topics. No curator chose a held-out
  document and no arm can train on one.
- `rank`: one alternative curator's scores of every pool document for every domain, from the same seeds
  (curation/baselines.py: BM25, MiniLM, the base model's dense hidden states). Deterministic given the
  seeds, so computed once and read by every trial's arm.
- `arm`: one arm's training documents, `budget` of them (`ArmKind`): a curator's best-scored for the domain,
  a seeded random draw from the pool, the oracle's (a seeded draw of the pool's topic-labelled documents),
  or a dose (a share of the oracle's draw, the rest off-topic documents of the random draw); and the
  calibration documents the pruning reads. Beside its rows a domain's arm writes `selection.json`.
- `union`: every arm's documents, each once, so the teacher rewrites each document once for all arms.
- `select`: one arm's rows of the distilled union(s), trained on the teacher's rewrite, or on the original
  text for the arm that measures what distillation is worth.

Each step writes its rows under `OUT/rows/` and a manifest, and skips itself when its config and inputs
are unchanged, like every stage.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import manifest, storage
from core.errors import ConfigError
from core.placement import run_remote
from core.reader import doc_id
from core.runtime import RunConfig
from core.stage import FilesPlan, Outcome, Stage, run_stage
from curation import baselines, demo_corpus
from curation.seeds import load_seeds

ROWS = "rows"
POOL = "pool"
POOL_INDEX = "pool.parquet"
HELDOUT = "heldout"
GENERAL = "general"
POOL_SHARDS = 8
SELECTION = "selection.json"
SCORES = "scores.parquet"

logger = logging.getLogger(__name__)


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
    """(held-out rows per domain and `general`, pool rows): disjoint, drawn in one seeded order, the general
    set first so that it holds the domains' topics too."""
    rows = _labelled_rows(config.seed)
    sets: dict[str, list[dict]] = {GENERAL: general_draw(rows, config.general)}
    taken = {row["id"] for row in sets[GENERAL]}
    for domain, topic in config.topics.items():
        sets[domain] = _of_topic([row for row in rows if row["id"] not in taken], topic)[: config.heldout]
        if len(sets[domain]) < config.heldout:
            hint = f"fewer than heldout={config.heldout}; lower `heldout` or check the topic's name"
            raise ConfigError(f"domains.{domain}", topic, f"labels {len(sets[domain])} documents of the corpus, {hint}")
        taken.update(row["id"] for row in sets[domain])
    rest = [row for row in rows if row["id"] not in taken]
    pool = [row for topic in config.topics.values() for row in _of_topic(rest, topic)[: config.pool_topic_docs]]
    others = [row for row in rest if row["meta"]["topic"] not in set(config.topics.values())]
    if len(pool) + len(others) < config.pool:
        raise ConfigError("pool", config.pool, f"only {len(pool) + len(others)} documents can fill it; lower it")
    pool += others[: config.pool - len(pool)]
    random.Random(config.seed).shuffle(pool)
    return sets, pool


def general_draw(rows: list[dict], size: int) -> list[dict]:
    """`size` rows holding every topic of `rows`: one each, the rest shared in proportion to each topic's
    count (largest remainders, ties by name), each topic's first rows in `rows`' order, kept in that order."""
    by_topic = Counter(row["meta"]["topic"] for row in rows)
    if size < len(by_topic):
        raise ConfigError("general_heldout", size, f"must be at least the corpus's {len(by_topic)} topics, so "
                          "that it holds every one")  # fmt: skip
    spare = size - len(by_topic)
    exact = {topic: spare * count / len(rows) for topic, count in by_topic.items()}
    quota = {topic: 1 + int(value) for topic, value in exact.items()}
    by_remainder = sorted(exact, key=lambda topic: (-(exact[topic] - int(exact[topic])), topic))
    for topic in by_remainder[: size - sum(quota.values())]:
        quota[topic] += 1
    kept: Counter[str] = Counter()
    chosen = []
    for row in rows:
        topic = row["meta"]["topic"]
        if kept[topic] < quota[topic]:
            kept[topic] += 1
            chosen.append(row)
    return chosen


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


Method = Literal["bm25", "minilm", "dense"]


@dataclass
class RankConfig(RunConfig):
    """One alternative curator's scores of every pool document for every domain, from the seeds."""

    execution_fields = RunConfig.execution_fields | {"cpus", "threads"}

    out: str = ""
    method: Method = "bm25"
    holdout: str = ""
    """The holdout step's output (its pool)."""
    seeds: str = ""
    domains: list[str] = field(default_factory=list)
    model: str = ""
    """For `dense`: the base model, read to `layer` (the curate layer), documents cut to `max_tokens`."""
    layer: int = 15
    max_tokens: int = 128
    dtype: str = "float32"
    cpus: float = 1.0
    threads: int = 0


def _plan_rank(config: RankConfig) -> FilesPlan:
    baselines.require(config.method)
    inputs = storage.expand([storage.join(config.holdout, POOL_INDEX), config.seeds], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def rank_pool(config: RankConfig) -> dict[str, Any]:
    """Score the pool (in a Ray task: the dense and MiniLM rankings load a model) and write `SCORES`: `id` and
    one score column per domain."""
    options = config.storage_options()
    pool = storage.read_parquet(storage.join(config.holdout, POOL_INDEX), options, columns=["id", "text"])
    seeds = load_seeds(config.seeds, options)
    mine = [i for i, domain in enumerate(seeds.domains) if domain in config.domains]
    dense = {"threads": config.threads}
    if config.method == "dense":
        dense |= {"model": config.model, "layer": config.layer, "max_tokens": config.max_tokens,
                  "dtype": config.dtype, "options": options}  # fmt: skip
    scores = baselines.rank(config.method, pool.column("text").to_pylist(), [seeds.texts[i] for i in mine],
                            [seeds.domains[i] for i in mine], list(config.domains), dense)  # fmt: skip
    table = pa.table({"id": pool.column("id"), **{d: scores[:, j] for j, d in enumerate(config.domains)}})
    storage.write_parquet_atomic(table, storage.join(config.out, SCORES), options)
    return {"documents": table.num_rows, "seeds": len(mine)}


def _rank(config: RankConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    return Outcome(run_remote(rank_pool, config.for_workers(), num_cpus=config.cpus))


RANK: Stage[RankConfig, FilesPlan] = Stage(
    "rank", _plan_rank, _rank, reads=lambda config: [config.holdout, config.seeds]
)


ArmKind = Literal["finescope", "bm25", "minilm", "dense", "random", "oracle", "dose", "calibration"]
STREAMS = {"random": 0, "oracle": 1, "calibration": 2, "dose": 3}
"""Each kind of draw has its own stream of random numbers, so that the random arm, the oracle, the
calibration documents and a dose of one seed are independent draws."""


@dataclass
class ArmConfig(RunConfig):
    """One arm's training documents: `budget` of them, chosen as `kind` says."""

    out: str = ""
    kind: ArmKind = "finescope"
    holdout: str = ""
    """The holdout step's output (its pool)."""
    curated: str | None = None
    """For `finescope`: a curate output whose rule kept `budget` documents per domain."""
    ranking: str | None = None
    """For `bm25`, `minilm`, `dense`: the rank step's output."""
    domain: str | None = None
    topic: str | None = None
    label: str = ""
    """The arm's model label (`finescope-t0`), written to selection.json."""
    budget: int = 150
    trial: int = 0
    """Seed of the random, oracle and dose draws (fine-tuning takes the same trial as its seed)."""
    dose: float | None = None
    """For `dose`: the share of the trial's oracle draw among the documents."""


def _draw(rows: pa.Table, budget: int, seed: int, stream: str, what: str) -> pa.Table:
    if rows.num_rows < budget:
        raise ConfigError("pool", rows.num_rows, f"holds {rows.num_rows} {what}, fewer than budget={budget}; "
                          "raise `pool` or lower `budget`")  # fmt: skip
    rows = rows.sort_by("id")  # the draw must not depend on the order the rows were read in
    picked = np.random.default_rng([seed, STREAMS[stream]]).choice(rows.num_rows, budget, replace=False)
    return rows.take(pa.array(np.sort(picked)))


def random_draw(pool: pa.Table, budget: int, trial: int) -> pa.Table:
    return _draw(pool, budget, trial, "random", "documents")


def oracle_draw(pool: pa.Table, topic: str, budget: int, trial: int) -> pa.Table:
    """`budget` of the pool's documents labelled `topic`: what a perfect curator would pick."""
    return _draw(_topic_rows(pool, topic), budget, trial, "oracle", f"documents of topic {topic!r}")


def _topic_rows(pool: pa.Table, topic: str, on: bool = True) -> pa.Table:
    match = pc.equal(pool.column("topic"), topic)
    return pool.filter(match if on else pc.invert(match))


def dose_draw(pool: pa.Table, topic: str, budget: int, trial: int, dose: float) -> pa.Table:
    """round(dose x budget) documents of the trial's oracle draw, the rest off-topic documents of its random
    draw (then, should it hold too few, of the rest of the pool), so the arm's on-topic share is exact."""
    on = round(dose * budget)
    topical = _draw(oracle_draw(pool, topic, budget, trial), on, trial, "dose", "oracle documents")
    drawn = _topic_rows(random_draw(pool, budget, trial), topic, on=False)
    if drawn.num_rows < budget - on:
        drawn_ids = set(drawn.column("id").to_pylist())
        rest = _topic_rows(pool, topic, on=False)
        rest = rest.filter(pa.array([i not in drawn_ids for i in rest.column("id").to_pylist()]))
        extra = _draw(rest, budget - on - drawn.num_rows, trial, "dose", "off-topic documents")
        return pa.concat_tables([topical, drawn, extra])
    return pa.concat_tables([topical, _draw(drawn, budget - on, trial, "dose", "off-topic documents")])


def _best(scored: pa.Table, column: str, budget: int, pool: pa.Table, what: str) -> pa.Table:
    """The pool rows of the `budget` best `column` scores (ties by id)."""
    if scored.num_rows < budget:
        hint = f"fewer than budget={budget}; curate with rule global_topn and top_n=budget"
        raise ConfigError("curate.top_n", scored.num_rows, f"{what} has {scored.num_rows} documents, {hint}")
    best = scored.sort_by([(column, "descending"), ("id", "ascending")]).slice(0, budget)
    wanted = set(best.column("id").to_pylist())
    return pool.filter(pa.array([i in wanted for i in pool.column("id").to_pylist()]))


def _curator_rows(config: ArmConfig, pool: pa.Table, options: storage.StorageOptions) -> pa.Table:
    if config.kind == "finescope":
        curated = storage.read_parquet(storage.join(config.curated, "curated"), options,
                                       columns=["id", "domain", "score"])  # fmt: skip
        mine = curated.filter(pc.equal(curated.column("domain"), config.domain))
        return _best(mine, "score", config.budget, pool, f"{config.domain}'s curation")
    scores = storage.read_parquet(storage.join(config.ranking, SCORES), options, columns=["id", config.domain])
    return _best(scores, config.domain, config.budget, pool, f"{config.kind}'s ranking")


def _plan_arm(config: ArmConfig) -> FilesPlan:
    index = storage.join(config.holdout, POOL_INDEX)
    curated = [storage.join(config.curated, "curated")] if config.curated else []
    ranking = [storage.join(config.ranking, SCORES)] if config.ranking else []
    inputs = storage.expand([index, *curated, *ranking], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def arm_rows(config: ArmConfig, pool: pa.Table, options: storage.StorageOptions) -> pa.Table:
    """The arm's documents (pool rows: id, text, topic), sorted by id."""
    if config.kind in ("finescope", "bm25", "minilm", "dense"):
        rows = _curator_rows(config, pool, options)
    elif config.kind == "oracle":
        rows = oracle_draw(pool, config.topic or "", config.budget, config.trial)
    elif config.kind == "dose":
        rows = dose_draw(pool, config.topic or "", config.budget, config.trial, config.dose or 0.0)
    elif config.kind == "calibration":
        rows = _draw(pool, config.budget, config.trial, "calibration", "documents")
    else:
        rows = random_draw(pool, config.budget, config.trial)
    return rows.sort_by("id")


def selection(config: ArmConfig, rows: pa.Table, pool: pa.Table) -> dict[str, Any]:
    """What the arm holds: its share of the domain's topic, and of the trial's oracle draw."""
    docs = rows.num_rows
    topics = rows.column("topic").to_pylist()
    oracle = set(oracle_draw(pool, config.topic or "", config.budget, config.trial).column("id").to_pylist())
    in_oracle = sum(i in oracle for i in rows.column("id").to_pylist())
    return {"arm": config.label, "domain": config.domain, "trial": config.trial, "docs": docs,
            "on_topic": sum(t == config.topic for t in topics) / docs if docs else 0.0,
            "oracle_overlap": in_oracle / docs if docs else 0.0}  # fmt: skip


def _arm(config: ArmConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    pool = storage.read_parquet(storage.join(config.holdout, POOL_INDEX), options)
    rows = arm_rows(config, pool, options)
    rows = rows.append_column("domain", pa.array([config.domain or config.kind] * rows.num_rows, pa.string()))
    _write_rows(rows, config.out, options)
    counts: dict[str, Any] = {"rows": rows.num_rows}
    if config.topic:
        chosen = selection(config, rows, pool)
        storage.write_bytes_atomic(storage.join(config.out, SELECTION), json.dumps(chosen, indent=1).encode(),
                                   options)  # fmt: skip
        counts |= {"on_topic": chosen["on_topic"], "oracle_overlap": chosen["oracle_overlap"]}
    return Outcome(counts)


ARM: Stage[ArmConfig, FilesPlan] = Stage(
    "arm", _plan_arm, _arm, reads=lambda config: [config.holdout, config.curated or "", config.ranking or ""],
    uses_ray=False,
)  # fmt: skip


def run_arm(config: ArmConfig) -> dict[str, Any]:
    return run_stage(ARM, config)


@dataclass
class UnionConfig(RunConfig):
    """Every arm's documents, each once: the teacher's input."""

    out: str = ""
    arms: list[str] = field(default_factory=list)
    """Arm outputs (their rows/ are read)."""
    covered: list[str] = field(default_factory=list)
    """Arm outputs whose documents another group's teacher pass rewrites: left out here."""


def _plan_union(config: UnionConfig) -> FilesPlan:
    inputs = storage.expand([rows_dir(arm) for arm in [*config.arms, *config.covered]], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def _union(config: UnionConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    tables = [storage.read_parquet(rows_dir(arm), options, columns=["id", "text"]) for arm in config.arms]
    everything = pa.concat_tables(tables).sort_by("id")
    ids = everything.column("id").to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    covered = {i for arm in config.covered for i in storage.read_parquet(rows_dir(arm), options, columns=["id"])
               .column("id").to_pylist()}  # fmt: skip
    keep = [first[i] and ids[i] not in covered for i in range(len(ids))]
    union = everything.filter(pa.array(keep, pa.bool_()))
    _write_rows(union, config.out, options)
    left = sum(first) - union.num_rows
    return Outcome({"rows": union.num_rows, "arm_rows": everything.num_rows, "covered_elsewhere": left})


UNION: Stage[UnionConfig, FilesPlan] = Stage(
    "union", _plan_union, _union, reads=lambda c: [*c.arms, *c.covered], uses_ray=False
)


def run_union(config: UnionConfig) -> dict[str, Any]:
    return run_stage(UNION, config)


@dataclass
class SelectConfig(RunConfig):
    """One arm's rows of the distilled union, with the target it trains on."""

    out: str = ""
    arm: str = ""
    distilled: list[str] = field(default_factory=list)
    """Distill steps' outputs (their distilled/ is read): a document takes its rewrite from the first that has
    it (greedy decoding rewrites a document the same way in every group)."""
    target: Literal["teacher", "original"] = "teacher"
    """`teacher`: the rewrite where the distiller accepted it (else the original); `original`: the raw text
    that follows the same prompt, for the arm that measures what distillation is worth."""


def _plan_select(config: SelectConfig) -> FilesPlan:
    dirs = [storage.join(d, "distilled") for d in config.distilled]
    inputs = storage.expand([rows_dir(config.arm), *dirs], config.storage_options())
    return FilesPlan(inputs, config.digest(inputs))


def _select(config: SelectConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    wanted = set(storage.read_parquet(rows_dir(config.arm), options, columns=["id"]).column("id").to_pylist())
    found: list[pa.Table] = []
    for group in config.distilled:
        distilled = storage.read_parquet(storage.join(group, "distilled"), options)
        ids = distilled.column("id").to_pylist()
        found.append(distilled.filter(pa.array([i in wanted for i in ids], pa.bool_())))
        wanted -= set(ids)
    rows = pa.concat_tables(found, promote_options="permissive").sort_by("id")
    if config.target == "original":
        at = rows.schema.get_field_index("response")
        rows = rows.set_column(at, "response", rows.column("original"))
    _write_rows(rows, config.out, options)
    accepted = int(pc.sum(rows.column("accepted")).as_py() or 0)
    return Outcome({"rows": rows.num_rows, "accepted": accepted, "not_distilled": len(wanted)})


SELECT: Stage[SelectConfig, FilesPlan] = Stage(
    "select", _plan_select, _select, reads=lambda config: [config.arm, *config.distilled], uses_ray=False
)


def run_select(config: SelectConfig) -> dict[str, Any]:
    return run_stage(SELECT, config)
