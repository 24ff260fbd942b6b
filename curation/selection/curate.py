"""Stage 1: curate a domain dataset from a corpus, a few seeds and an SAE, on Ray Data.

read -> clean -> tokenize -> encode (truncated forward, SAE, pooling, cosine to every seed) -> write
`scored/` -> per-block top-N -> merge on the driver -> write `curated/`, `rejects/`, `report.md`,
and, last, `manifest.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch

from core import manifest, models, storage
from core.errors import ConfigError, check_range, check_ranges
from core.placement import describe_dtype
from core.progress import ray_counter
from core.reader import CleanConfig, count_rejects
from core.runtime import RunConfig
from core.stage import Outcome, Stage, run_stage
from curation.encode import Pooling, weighted_unit
from curation.encode_pipeline import encode_shards, prepare_encoder
from curation.explain import DomainDrivers, domain_drivers, row_explanations
from curation.latent_weights import SAMPLE_FILE, STATS_FILE, LatentSample, LatentStats
from curation.sae.model import TopKSAE
from curation.seeds import Seeds, load_seeds
from curation.selection.rules import (
    SelectionRule,
    SelectionSettings,
    block_candidates,
    label_selected,
    merge_candidates,
)
from curation.selection.scorers import DEFAULT_SCORER, LEARNED, SCORERS, Scorer, query_names, resolve_feedback

logger = logging.getLogger(__name__)


@dataclass
class CurateConfig(RunConfig):
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "actors",
        "cpus",
        "threads",
        "read_attempts",
        "read_backoff_s",
    }
    added_fields: ClassVar[dict[str, Any]] = {"scorer": "nearest", "feedback": 0}

    corpus: list[str] = field(default_factory=list)
    """Corpus shards: paths, directories or globs (`**` allowed), local or s3://. JSONL(.gz/.zst) or Parquet."""
    seeds: str = ""
    """JSONL file of seed examples: {"text": ..., "domain": ...}; several domains may share one file."""
    sae: str = ""
    """SAE directory written by `python -m jobs.train_sae` (cfg.json + sae.safetensors)."""
    out: str = ""
    """Output directory, local or s3://: curated/, scored/, rejects/, report.md, manifest.json."""
    model: str | None = None
    """Base model (an embedded name, a Hugging Face directory, a .gguf file, a Hub id org/name[@revision] or an
    s3:// prefix); defaults to the one the SAE was trained on."""
    rule: SelectionRule | None = None
    """Selection rule. Unset: `threshold` when --threshold is given, else `per_seed_topn` (the paper's)."""
    top_n: int = 100
    """Documents per seed (per_seed_topn) or per domain (global_topn)."""
    threshold: float | None = None
    """Cosine-similarity cut for the `threshold` rule."""
    max_tokens: int = 256
    """Tokens of each document that are encoded (a longer document is cut)."""
    pooling: Pooling = "rate"
    """SAE codes to a document vector: `rate`, the share of its tokens each latent fires on, or `mean`."""
    weighting: Literal["idf", "none"] = "idf"
    """How much each latent counts in the cosine: `idf`, by its rarity over the corpus's documents, measured
    when the SAE was trained (curation/latent_weights.py); `none`, all alike (the paper's)."""
    scorer: Scorer = DEFAULT_SCORER
    """What documents are compared with (curation/selection/scorers.py): `classifier`, per domain a logistic
    regression of its seeds against a corpus sample (the default: it ranks best on the curation-quality
    bench's development topics, docs/results.md); `background`, per domain the mean of its seeds less the
    mean of that sample; `nearest`, each seed, a domain scoring by its best (the paper's). The sample is the
    one `jobs.train_sae` measured the latent statistics on, kept beside the SAE."""
    feedback: int | None = None
    """Learned scorers only: each domain's this many best sample documents that no other domain scores higher
    join its seeds, and its query is learned again (pseudo-relevance feedback on the corpus sample); 0 turns
    it off. Unset: 80, or one in 25 of the sample's documents where that is fewer (0 under `nearest`)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The truncated forward's precision: auto is bfloat16 where the encode device computes it natively and
    fast (a GPU with bf16; a CPU whose bf16 matmuls measure at least 1.25x float32's, as AMX does), float32
    elsewhere; it is decided once per run and recorded in the manifest (`dtype`). bf16 keeps vectors within
    cosine 0.99 of float32's (docs/results.md). SAE, pooling and scores stay in float32."""
    min_chars: int = 1
    """Documents shorter than this, after stripping, are rejected."""
    max_chars: int = 20_000
    """Documents longer than this are truncated or rejected (see too_long)."""
    too_long: Literal["truncate", "reject"] = "truncate"
    """What to do with a document over max_chars: truncate or reject."""
    actors: int = 1
    """Model actors in the encode pool (one per GPU on a cluster)."""
    cpus: float = 1.0
    """CPUs each encode actor reserves. Keep it below the node's CPUs so read tasks can run."""
    gpus: float = 0.0
    """GPUs each encode actor reserves; > 0 runs the encoder on CUDA."""
    threads: int = 0
    """Torch threads per actor; 0 picks from the machine (local) or cpus (cluster)."""
    batch_size: int = 256
    """Documents per encode batch; each is cut into length-sorted micro-batches."""
    max_batch_tokens: int = 8192
    """Padded tokens per forward micro-batch."""
    max_batch_rows: int = 64
    """Documents per forward micro-batch at most. On a GPU raise it with max_batch_tokens and batch_size
    (docs/cluster.md, "Encoding on GPUs")."""
    read_attempts: int = 5
    """Tries of each open or read of a corpus shard when storage fails transiently (connection errors,
    timeouts, 5xx); if all fail, the run fails, with no manifest, instead of losing the shard's rows."""
    read_backoff_s: float = 1.0
    """Seconds before the second try of a failed shard read; doubled for each further try, up to 30 s."""

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        for name in ("seeds", "sae", "out"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: pass --{name}")
        if not self.corpus:
            raise ConfigError("corpus", self.corpus, "is required: pass --corpus PATH_OR_GLOB")
        check_rule(self)
        check_scorer(self)
        sizes = ("top_n", "max_tokens", "actors", "batch_size", "max_batch_tokens", "max_batch_rows")
        check_ranges(self, sizes, ge=1)
        if self.max_batch_tokens < self.max_tokens:
            raise ConfigError("max_batch_tokens", self.max_batch_tokens, f"must be >= max_tokens={self.max_tokens}")
        check_range("cpus", self.cpus, gt=0, hint="fractions are fine")
        check_range("gpus", self.gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the machine")
        self.clean_config()

    def clean_config(self) -> CleanConfig:
        if self.too_long not in ("truncate", "reject"):
            raise ConfigError("too_long", self.too_long, "must be truncate or reject")
        return CleanConfig(
            min_chars=self.min_chars,
            max_chars=self.max_chars,
            too_long=self.too_long,  # type: ignore[arg-type]
            read_attempts=self.read_attempts,
            read_backoff_s=self.read_backoff_s,
        )


def check_scorer(config: Any) -> None:
    """A config's `scorer` is one FineScope has, and its `feedback` one the scorer takes (unset under
    `nearest` becomes 0, so that the paper's scoring hashes as it did before there was a choice)."""
    if config.scorer not in SCORERS:
        raise ConfigError("scorer", config.scorer, f"must be one of {', '.join(SCORERS)}")
    check_range("feedback", config.feedback, ge=0, optional=True, hint="sample documents per domain; 0 turns it off")
    if config.feedback is None and config.scorer not in LEARNED:
        config.feedback = 0
    if config.feedback and config.scorer not in LEARNED:
        raise ConfigError("feedback", config.feedback, f"needs a learned scorer: pass --scorer classifier or "
                          f"--scorer background, or --feedback 0 with --scorer {config.scorer}")  # fmt: skip


def check_rule(config: Any) -> None:
    """Resolve an unset `rule` of a config with `rule`, `top_n` and `threshold` fields, and check them."""
    check_range("threshold", config.threshold, ge=-1.0, le=1.0, optional=True, hint="a cosine similarity")
    if config.rule is None:
        config.rule = "threshold" if config.threshold is not None else "per_seed_topn"
    if config.rule == "threshold" and config.threshold is None:
        raise ConfigError("threshold", None, "the threshold rule needs --threshold T (a cosine in [-1, 1])")
    check_range("top_n", config.top_n, ge=1)


@dataclass
class CurationPlan:
    """What validation found, so the run itself starts from checked facts."""

    config: CurateConfig
    inputs: list[storage.FileInfo]
    seeds: Seeds
    sae: TopKSAE
    model: str
    digest: str
    latent_weights: list[float] | None = None
    """The rarity weights of `weighting: idf`; None for `none`."""
    background: np.ndarray | None = None
    """The learned scorers' corpus sample, (docs, latents) vectors weighted and unit-normed as the documents'
    are; None for `nearest`."""
    feedback: int = 0
    """The config's `feedback`, resolved for this sample (curation/selection/scorers.py, `resolve_feedback`)."""


def plan(config: CurateConfig) -> CurationPlan:
    """Check everything that can be checked without Ray, in about a second."""
    options = config.storage_options()
    seeds = load_seeds(config.seeds, options)
    inputs = manifest.corpus_files(config.corpus, options)
    sae, model, weights = load_encoder_inputs(config.sae, config.model, config.weighting, options)
    background = load_background(config.sae, sae, config.scorer, config.pooling, weights, options)
    seed_info = storage.expand(config.seeds, options, config_field="seeds")
    sae_info = storage.expand(config.sae, options, config_field="sae")
    digest = config.digest([*inputs, *seed_info, *sae_info, *models.model_inputs(model, options)])
    feedback = resolve_feedback(config.scorer, config.feedback, 0 if background is None else len(background))
    return CurationPlan(config, inputs, seeds, sae, model, digest, weights, background, feedback)


def load_background(
    sae_uri: str,
    sae: TopKSAE,
    scorer: str,
    pooling: str,
    weights: list[float] | None,
    options: storage.StorageOptions | None,
) -> np.ndarray | None:
    """The learned scorers' corpus sample as document vectors (None for `nearest`), checked: present beside the
    SAE, of its width, pooled as this run pools."""
    if scorer not in LEARNED:
        return None
    try:
        sample = LatentSample.load(sae_uri, sae.cfg.num_latents, options)  # the one file, not the SAE again
    except ValueError as error:
        raise ConfigError("sae", sae_uri, f"{error}; train it again with `python -m jobs.train_sae`") from None
    if sample is None:
        fix = "train it again with `python -m jobs.train_sae`, or pass --scorer nearest"
        raise ConfigError("scorer", scorer, f"the SAE at {sae_uri} has no {SAMPLE_FILE} (its corpus sample): {fix}")
    if sample.pooling != pooling:
        raise ConfigError("pooling", pooling, f"the SAE's corpus sample was pooled by {sample.pooling!r}: pass "
                          f"--pooling {sample.pooling}, or --scorer nearest")  # fmt: skip
    scale = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return weighted_unit(sample.pooled, scale).numpy()


def load_encoder_inputs(
    sae_uri: str, model: str | None, weighting: str, options: storage.StorageOptions | None
) -> tuple[TopKSAE, str, list[float] | None]:
    """(the SAE, the base model it reads, the rarity weights or None for `weighting: none`), each checked
    against the others: the SAE's layer and coordinates within the model, its statistics its own."""
    if not storage.exists(storage.join(sae_uri, "cfg.json"), options):
        raise ConfigError("sae", sae_uri, "no cfg.json there; train one with `python -m jobs.train_sae`")
    sae, stats = _load_sae(sae_uri, storage.local_copy(sae_uri, options))
    model = model or sae.cfg.base_model.get("name")
    if not model:
        raise ConfigError("model", None, "the SAE does not name its base model; pass --model")
    info = models.model_info(model, options)
    if sae.cfg.layer >= info.num_layers:
        raise ConfigError("sae", sae_uri, f"its layer {sae.cfg.layer} is beyond {model}'s {info.num_layers} layers")
    if sae.cfg.coords and max(sae.cfg.coords) >= info.hidden_size:
        raise ConfigError("sae", sae_uri, f"reads coordinates beyond {model}'s hidden size {info.hidden_size}")
    if weighting != "idf":
        return sae, model, None
    if stats is None:
        raise ConfigError(
            "weighting", "idf", f"the SAE at {sae_uri} has no {STATS_FILE}: train it again with "
            "`python -m jobs.train_sae` (which measures it), or pass --weighting none",
        )  # fmt: skip
    if len(stats.fired_in) != sae.cfg.num_latents:
        raise ConfigError("sae", sae_uri, f"{STATS_FILE} has {len(stats.fired_in)} latents, the SAE "
                          f"{sae.cfg.num_latents}: it belongs to another SAE; train this one again")  # fmt: skip
    return sae, model, stats.weights().tolist()


def _load_sae(sae: str, local_dir: str) -> tuple[TopKSAE, LatentStats | None]:
    """The SAE and its latent statistics, refused when either holds what no score can be made of (NaN or
    infinite weights from a training that diverged, counts that are no counts)."""
    try:
        return TopKSAE.load(local_dir), LatentStats.load(local_dir)
    except ValueError as error:
        raise ConfigError("sae", sae, f"{error}; train it again with `python -m jobs.train_sae`") from None


def _candidates_udf(batch: pa.Table, spec: SelectionSettings) -> pa.Table:
    sims = np.stack(batch.column("seed_sims").to_numpy(zero_copy_only=False))
    ids = batch.column("id").to_numpy(zero_copy_only=False)
    sources = batch.column("source").to_numpy(zero_copy_only=False)
    return block_candidates(ids, sources, sims, spec)


def label_rows(batch: pa.Table, spec: SelectionSettings, selected: dict[str, tuple[str, list[int]]]) -> pa.Table:
    """Scored rows -> the curated rows among them: one row per (selected document, domain), its kept source only.

    Each row carries `top_latents` and `latent_contributions`: the latents behind its score for that
    domain, from the scored row's explanation columns (curation/explain.py), and `rest_contribution`, the
    score less those terms: what every other latent adds (0 when the listed ones are all the document
    shares with its query; below 0 where a learned scorer counts other latents against it).
    """
    ids = batch.column("id").to_pylist()
    sources = batch.column("source").to_pylist()
    keep = [
        i for i, (doc_id, src) in enumerate(zip(ids, sources, strict=True)) if selected.get(doc_id, ("",))[0] == src
    ]
    batch = batch.take(pa.array(keep, type=pa.int64()))
    n_keys = len(spec.seed_domains) if spec.rule == "per_seed_topn" else len(spec.domains)
    chosen = np.zeros((len(keep), n_keys), dtype=bool)
    for row, doc_id in enumerate(batch.column("id").to_pylist()):
        chosen[row, selected[doc_id][1]] = True
    sims = (
        np.stack(batch.column("seed_sims").to_numpy(zero_copy_only=False))
        if len(keep)
        else np.zeros((0, len(spec.seed_domains)))
    )
    labels = label_selected(np.asarray(batch.column("id").to_pylist(), dtype=object), sims, spec, chosen)
    by_id = {doc_id: i for i, doc_id in enumerate(batch.column("id").to_pylist())}
    take = pa.array([by_id[doc_id] for doc_id in labels.column("id").to_pylist()], type=pa.int64())
    rows = batch.take(take)
    position = {domain: index for index, domain in enumerate(spec.domains)}
    domain_index = np.asarray([position[domain] for domain in labels.column("domain").to_pylist()], dtype=np.int64)
    top_latents, contributions = row_explanations(rows, domain_index, len(spec.domains))
    listed = np.array([sum(terms) if terms is not None else np.nan for terms in contributions.to_pylist()])
    rest = (labels.column("score").to_numpy() - listed).astype(np.float32)
    return pa.table(
        {
            "id": labels.column("id"),
            "text": rows.column("text"),
            "domain": labels.column("domain"),
            "score": labels.column("score"),
            "nearest_seed": _seed_names(labels.column("nearest_seed").to_pylist(), spec),
            "source": rows.column("source"),
            "meta": rows.column("meta"),
            "n_tokens": rows.column("n_tokens"),
            "top_latents": top_latents,
            "latent_contributions": contributions,
            "rest_contribution": pa.array(rest, pa.float32(), mask=np.isnan(rest)),
        }
    )


def _seed_names(indices: list[int], spec: SelectionSettings) -> pa.Array:
    """Seed indices -> the seeds' ids, which survive a reordered or edited seeds file."""
    ids = spec.seed_ids or [str(index) for index in range(len(spec.seed_domains))]
    return pa.array([ids[index] for index in indices], pa.string())


def selection_settings(config: Any, seeds: Seeds, scorer: str | None = None) -> SelectionSettings:
    """The selection a config with `rule`, `top_n`, `threshold` and `scorer` asks for, over the queries its
    scorer makes of these seeds (one per seed under `nearest`, one per domain otherwise, which stands for
    the domain's seeds in `per_seed_topn`'s size)."""
    scorer = scorer or getattr(config, "scorer", "nearest")
    domains, ids = query_names(seeds.domains, seeds.ids, scorer)
    return SelectionSettings(
        rule=config.rule,  # type: ignore[arg-type]
        seed_domains=domains,
        top_n=config.top_n,
        threshold=config.threshold if config.threshold is not None else 0.0,
        seed_ids=ids,
        query_seeds=None if scorer == "nearest" else [seeds.domains.count(domain) for domain in domains],
    )


EMPTY_SELECTION = "empty.parquet"
"""The one file of a selection that chose no document: no rows, the curated columns."""


def select_and_write(
    selection: SelectionSettings, scored_dir: str, curated_dir: str, options: storage.StorageOptions
) -> None:
    """Scored rows -> the selected documents, labelled, written to `curated_dir`. Ray must be initialised.

    Two passes over `scored_dir`, so that only candidates (ids, sources, scores), never texts, reach the
    driver: each block's candidates are merged there into the selection, then the selected documents' full
    rows are labelled and written by the workers.
    """
    import ray

    scored_target = storage.arrow_target(scored_dir, options)
    scored_in = ray.data.read_parquet(scored_target["path"], filesystem=scored_target["filesystem"])
    candidates = scored_in.select_columns(["id", "source", "seed_sims"]).map_batches(
        _candidates_udf,
        fn_kwargs={"spec": selection},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.5,
    )
    candidate_table = pa.concat_tables(ray.get(candidates.to_arrow_refs()))
    selected = merge_candidates(candidate_table, selection)
    if not selected:  # Ray writes no file for no rows; readers find the empty set, with its columns, instead
        empty = label_rows(scored_in.schema().base_schema.empty_table(), selection, selected)
        storage.write_parquet_atomic(empty, storage.join(curated_dir, EMPTY_SELECTION), options)
        return
    curated = scored_in.map_batches(
        label_rows,
        fn_kwargs={"spec": selection, "selected": selected},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.5,
    )
    curated.write_parquet(**storage.arrow_target(curated_dir, options))


def _curate(config: CurateConfig, checked: CurationPlan, timer: manifest.Timer) -> Outcome:
    """Stage 1's work: seeds, encode, select, report (core.stage.run_stage does the rest)."""
    options = config.storage_options()
    selection = selection_settings(config, checked.seeds)
    with timer("seeds"):
        spec, seeds_matrix, decision = prepare_encoder(config, checked)
    scored_dir = storage.join(config.out, "scored")
    rejects_dir = storage.join(config.out, "rejects")
    curated_dir = storage.join(config.out, "curated")
    # The corpus's document count is unknown until it is read: the lines give the count and rate, no ETA.
    with timer("encode"), ray_counter("curate encode", unit="docs") as progress:
        uris = [info.uri for info in checked.inputs]
        encode_shards(config, checked, uris, spec, seeds_matrix, scored_dir, rejects_dir, progress=progress)
    with timer("select"):
        select_and_write(selection, scored_dir, curated_dir, options)
    counts = _counts(config, options, scored_dir, curated_dir, rejects_dir)
    drivers = domain_drivers(seeds_matrix, selection.seed_domains)
    with timer("report"):
        _write_report(config, checked, counts, timer.timings, drivers, decision)
    logger.info("curated %s rows into %s (%s)", counts["curated_rows"], curated_dir, counts["by_domain"])
    extra = {"model": checked.model, "sae": config.sae, "domains": selection.domains, "scorer": config.scorer,
             "feedback": checked.feedback, "driving_latents": drivers.as_dict(), "dtype": decision}  # fmt: skip
    return Outcome(counts, extra)


CURATE: Stage[CurateConfig, CurationPlan] = Stage(
    "curate", plan, _curate, reads=lambda config: [*config.corpus, config.seeds, config.sae, config.model or ""]
)


def run_curation(config: CurateConfig) -> dict[str, Any]:
    """Run stage 1 end to end and return its manifest (core.stage.run_stage: skips a finished run)."""
    return run_stage(CURATE, config)


def _write_report(
    config: CurateConfig,
    checked: CurationPlan,
    counts: dict[str, Any],
    timings: dict[str, float],
    drivers: DomainDrivers,
    decision: dict[str, Any],
) -> None:
    from curation.selection.explain_report import TokenSource
    from curation.selection.report import write_report

    tokens = TokenSource(checked.model, config.max_tokens)
    options = config.storage_options()
    write_report(config.out, options, checked.seeds, counts, timings, drivers=drivers, tokens=tokens,
                 precision=describe_dtype(decision))  # fmt: skip


def _counts(config, options, scored_dir, curated_dir, rejects_dir) -> dict[str, Any]:
    rejects = count_rejects(rejects_dir, options)
    return output_counts(options, scored_dir, curated_dir, rejects)


def output_counts(
    options: storage.StorageOptions | None, scored_dir: str, curated_dir: str, rejects: dict[str, int]
) -> dict[str, Any]:
    """A curate-shaped output's manifest counts: documents and tokens scored, rows curated, rejects by reason."""
    scored = storage.read_parquet(scored_dir, options, columns=["id", "n_tokens"])
    curated = (
        storage.read_parquet(curated_dir, options, columns=["domain"])
        if storage.exists(curated_dir, options)
        else pa.table({"domain": pa.array([], pa.string())})
    )
    by_domain: dict[str, int] = {}
    for domain in curated.column("domain").to_pylist():
        by_domain[domain] = by_domain.get(domain, 0) + 1
    return {
        "documents": scored.num_rows,
        "tokens": int(np.asarray(scored.column("n_tokens")).sum()) if scored.num_rows else 0,
        "rejected": sum(rejects.values()),
        "rejects_by_reason": rejects,
        "curated_rows": curated.num_rows,
        "by_domain": by_domain,
    }
