"""Select again from a finished curate output: another rule, size, weighting or set of seeds, no corpus encode.

`jobs.curate` keeps every document's pooled SAE code in `scored/` (`code_latents`, `code_values`: its nonzero
latents before the rarity weighting, curation/encode.py). This stage reads those codes, encodes only the
seeds (a handful of texts, in one Ray task holding the model, as curate does), and scores every document
against them exactly as the encode actor would have:

read scored/ codes -> vectors (weighting, unit norm) -> cosine to every seed, explanation columns -> write
`scored/` -> per-block top-N -> merge on the driver -> write `curated/`, `report.md`, and, last, `manifest.json`.

The output has a curate output's layout, so every stage that reads one (split, prune, distill) reads it,
and it can itself be selected from again. With the settings of the run it reads, it selects the same
documents with the same scores (to float rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch

from core import manifest, storage
from core.errors import ConfigError, check_range
from core.logs import worker_logging
from core.placement import describe_dtype, requested_device, run_remote
from core.runtime import RunConfig, default_threads
from core.stage import Outcome, Stage, run_stage
from curation.encode import CODE_COLUMNS, DocumentEncoder, EncoderSettings, dense_codes, weighted_unit
from curation.encode_pipeline import seed_vectors
from curation.explain import DomainDrivers, domain_drivers, top_contributions
from curation.sae.model import TopKSAE
from curation.seeds import Seeds, load_seeds
from curation.selection.curate import (
    check_rule,
    check_scorer,
    load_background,
    load_encoder_inputs,
    output_counts,
    select_and_write,
    selection_settings,
)
from curation.selection.rules import SelectionRule, nearest_seeds
from curation.selection.scorers import domain_queries, resolve_feedback

logger = logging.getLogger(__name__)

STAGE = "reselect"
SOURCE_STAGES = ("curate", STAGE)
"""The outputs whose stored codes can be selected from: a curate output, or one of this stage's own."""
SCORED_READS = {stage: "scored" for stage in SOURCE_STAGES}
"""What --scored reads of such an output: its `scored/`, which no other stage reads (core/manifest.py)."""
RESCORE_ROWS = 256
"""Documents made dense at once: (rows, latents) float32, 2.4 MB for SmolLM2's 2,304 latents."""


@dataclass
class ReselectConfig(RunConfig):
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {"cpus", "threads"}
    added_fields: ClassVar[dict[str, Any]] = {"scorer": "scored", "feedback": None}

    scored: str = ""
    """The output directory of `python -m jobs.curate` (or of this job) to select from; its scored/ is read."""
    seeds: str = ""
    """JSONL file of seed examples: {"text": ..., "domain": ...}; the same seeds, others, or a new domain's."""
    out: str = ""
    """Output directory, local or s3://: curated/, scored/, report.md, manifest.json, as curate writes them."""
    rule: SelectionRule | None = None
    """Selection rule. Unset: `threshold` when --threshold is given, else `per_seed_topn` (the paper's)."""
    top_n: int = 100
    """Documents per seed (per_seed_topn) or per domain (global_topn)."""
    threshold: float | None = None
    """Cosine-similarity cut for the `threshold` rule."""
    weighting: Literal["scored", "idf", "none"] = "scored"
    """How much each latent counts in the cosine: `scored`, as in the output read; `idf`, by its rarity (the
    SAE's latent_stats.json); `none`, all alike."""
    scorer: Literal["scored", "nearest", "background", "classifier"] = "scored"
    """What documents are compared with (curation/selection/scorers.py): `scored`, as in the output read; or
    any scorer of `jobs.curate`."""
    feedback: int | None = None
    """A learned scorer's feedback documents per domain (`jobs.curate --feedback`); unset: as in the output
    read when the scorer is too, else the scorer's default."""
    cpus: float = 1.0
    """CPUs of the task that encodes the seeds (and of nothing else: the corpus is not encoded again)."""
    gpus: float = 0.0
    """GPUs of the task that encodes the seeds; > 0 runs it on CUDA."""
    threads: int = 0
    """Torch threads of that task; 0 picks from the machine (local) or cpus (cluster)."""

    def __post_init__(self) -> None:
        for name in ("scored", "seeds", "out"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: pass --{name}")
        check_rule(self)
        check_range("feedback", self.feedback, ge=0, optional=True, hint="sample documents per domain")
        check_range("cpus", self.cpus, gt=0, hint="fractions are fine")
        check_range("gpus", self.gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the machine")


@dataclass
class ReselectPlan:
    """What validation found: the output read, its stored codes, the seeds, and how they are encoded."""

    inputs: list[storage.FileInfo]
    digest: str
    source: dict[str, Any]
    """The manifest of the output read."""
    encoding: dict[str, Any]
    """How its codes were made (`ENCODING`), from its manifest."""
    scored_files: list[str]
    seeds: Seeds
    sae: TopKSAE
    model: str
    weighting: str
    latent_weights: list[float] | None
    scorer: str
    feedback: int
    background: np.ndarray | None
    """The learned scorers' corpus sample as vectors (curation/selection/curate.py, `load_background`)."""


def scoring_of(source: dict[str, Any]) -> tuple[str, int]:
    """The scorer and feedback of the output whose manifest is `source` (`nearest`, 0 for one curated before
    there was a choice). The feedback is the one the run resolved for its SAE's sample, which its manifest
    records beside the config (a config's unset feedback means the scorer's default)."""
    config = source.get("config") or {}
    scorer = source.get("scorer") or config.get("scorer") or "nearest"
    return scorer, int(source.get("feedback", config.get("feedback")) or 0)


def _scoring(config: ReselectConfig, source: dict[str, Any]) -> tuple[str, int | None]:
    """The scorer and feedback this re-selection scores with, checked as curate checks them; a feedback of
    None is the scorer's default, resolved once the SAE's sample is read."""
    scored_scorer, scored_feedback = scoring_of(source)
    scorer = scored_scorer if config.scorer == "scored" else config.scorer
    if config.feedback is not None:
        feedback: int | None = config.feedback
    else:
        feedback = scored_feedback if scorer == scored_scorer else None
    checked = SimpleNamespace(scorer=scorer, feedback=feedback)
    check_scorer(checked)
    return scorer, checked.feedback


def _source_manifest(config: ReselectConfig, options: storage.StorageOptions) -> dict[str, Any]:
    """The manifest of the output --scored names, refused unless it is one whose codes this stage reads."""
    found = manifest.read_manifest(config.scored, options)
    stage = (found or {}).get("stage")
    if stage not in SOURCE_STAGES:
        what = f"is the output of `{stage}`" if stage else "holds no manifest.json of a finished curation"
        raise ConfigError("scored", config.scored, f"{what}; pass the output directory of `python -m jobs.curate` "
                          "(or of `python -m jobs.select`), the one holding its manifest.json and scored/")  # fmt: skip
    return found  # type: ignore[return-value]


ENCODING = {"sae": "", "pooling": "rate", "max_tokens": 256, "max_batch_tokens": 8192, "max_batch_rows": 64,
            "weighting": "none"}  # fmt: skip
"""The settings of the encode that wrote a scored/ (with their defaults), which the seeds must be encoded with."""


def encoding_of(source: dict[str, Any]) -> dict[str, Any]:
    """`ENCODING` of the output whose manifest is `source`: a curate's config, or what a re-selection recorded."""
    recorded = source.get("encoding") if source.get("stage") == STAGE else source.get("config")
    return {name: (recorded or {}).get(name, default) for name, default in ENCODING.items()}


def _check_codes(files: list[storage.FileInfo], config: ReselectConfig, options: storage.StorageOptions) -> None:
    """Refuse scored files written before the codes were kept: nothing in them can be scored again."""
    import pyarrow.parquet as pq

    if not files:
        raise ConfigError("scored", config.scored, "its scored/ holds no *.parquet file: it scored no document")
    with storage.open_read(files[0].uri, options) as handle:
        names = pq.read_schema(handle).names
    if not set(CODE_COLUMNS) <= set(names):
        raise ConfigError("scored", config.scored, f"its scored/ has no stored codes ({', '.join(CODE_COLUMNS)}): "
                          "it was curated before they were kept; run `python -m jobs.curate` once more")  # fmt: skip


def plan(config: ReselectConfig) -> ReselectPlan:
    """Check everything that can be checked without Ray: the output read, its codes, the seeds, the SAE."""
    options = config.storage_options()
    seeds = load_seeds(config.seeds, options)
    files = manifest.input_files(config.scored, field="scored", reads=SCORED_READS, options=options,
                                 suffixes=(".parquet",))  # fmt: skip
    source = _source_manifest(config, options)
    _check_codes(files, config, options)
    encoding = encoding_of(source)
    weighting = encoding["weighting"] if config.weighting == "scored" else config.weighting
    sae, model, weights = load_encoder_inputs(encoding["sae"], source.get("model"), weighting, options)
    scorer, feedback = _scoring(config, source)
    background = load_background(encoding["sae"], sae, scorer, encoding["pooling"], weights, options)
    feedback = resolve_feedback(scorer, feedback, 0 if background is None else len(background))
    seed_info = storage.expand(config.seeds, options, config_field="seeds")
    sae_info = storage.expand(encoding["sae"], options, config_field="sae")
    inputs = [*files, *seed_info, *sae_info]
    scoring = {"weighting": weighting, **({"scorer": scorer, "feedback": feedback} if scorer != "nearest" else {})}
    digest = config.digest(inputs, **scoring, model=model, scored_hash=source.get("hash"))
    uris = [info.uri for info in files]
    return ReselectPlan(inputs, digest, source, encoding, uris, seeds, sae, model, weighting, weights, scorer,
                        feedback, background)  # fmt: skip


# The seeds: the one model load ---------------------------------------------------------------------------


def _encode_seed_vectors(spec: EncoderSettings, sae: TopKSAE, seeds: Seeds, max_tokens: int) -> np.ndarray:
    """The seeds' unit vectors, in float32, by the encoder curate scores seeds with (curation/encode_pipeline.py)."""
    worker_logging()
    return seed_vectors(DocumentEncoder(spec, sae=sae), seeds, max_tokens)


def _seed_spec(config: ReselectConfig, checked: ReselectPlan) -> EncoderSettings:
    """The seeds' encoder: the encoding settings of the run whose codes are read, on this job's resources."""
    encoding = checked.encoding
    threads = config.threads or default_threads(1, config.cpus, config.ray_address)
    return EncoderSettings(
        model=checked.model,
        sae_dir=None,
        layer=checked.sae.cfg.layer,
        skip_positions=checked.sae.cfg.skip_positions,
        pooling=encoding["pooling"],
        max_batch_tokens=encoding["max_batch_tokens"],
        max_batch_rows=encoding["max_batch_rows"],
        device=requested_device(config.gpus),
        dtype="float32",  # seeds are always encoded in float32 (curation/encode_pipeline.py, `_encode_seeds`)
        threads=threads,
        latent_weights=checked.latent_weights,
    )


# Scoring the stored codes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rescoring:
    """What every block is scored with: small and picklable."""

    seed_vectors: np.ndarray
    latent_weights: list[float] | None
    width: int
    drivers: DomainDrivers
    keep_driver_columns: bool
    """The domains' driving latents are those the encode recorded peaks for: keep its `driver_*` columns."""


def _tensor_column(values: np.ndarray) -> pa.Array:
    """A 2-D array as the tensor column Ray Data writes for one (as the encode actor's columns are)."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(values))


def rescore_block(batch: pa.Table, rescoring: Rescoring) -> pa.Table:
    """Scored rows -> the same rows scored against the new seeds: `seed_sims` and the explanation columns."""
    pooled = dense_codes(batch.column("code_latents"), batch.column("code_values"), rescoring.width)
    weights = None if rescoring.latent_weights is None else torch.tensor(rescoring.latent_weights, dtype=torch.float32)
    vectors = weighted_unit(pooled, weights)
    seeds = torch.from_numpy(np.array(rescoring.seed_vectors, dtype=np.float32))  # a copy: Ray hands it read-only
    sims = (vectors @ seeds.T).numpy().astype(np.float32)
    latents, terms = top_contributions(vectors, seeds, nearest_seeds(sims, rescoring.drivers.members))
    flat = (batch.num_rows, latents.shape[1] * latents.shape[2])
    columns = {"seed_sims": sims, "domain_latents": latents.reshape(flat), "domain_contributions": terms.reshape(flat)}
    if not rescoring.keep_driver_columns:
        batch = batch.drop_columns(
            [name for name in ("driver_peaks", "driver_positions") if name in batch.column_names]
        )
    for name, values in columns.items():
        column = _tensor_column(values)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    return batch


def _same_drivers(drivers: DomainDrivers, source: dict[str, Any]) -> bool:
    """Whether each domain's driving latents are those the encode recorded `driver_peaks` for."""
    recorded = source.get("driving_latents") or {}
    return list(recorded) == drivers.domains and all(
        [int(latent) for latent, _ in recorded[domain]] == drivers.latents[index].tolist()
        for index, domain in enumerate(drivers.domains)
    )


def _rescore(checked: ReselectPlan, rescoring: Rescoring, scored_dir: str, options: storage.StorageOptions) -> None:
    """The stored codes of every scored document -> `scored_dir`, scored against the new seeds, on Ray Data."""
    import ray

    source = storage.arrow_target(checked.scored_files, options)
    rows = ray.data.read_parquet(source["path"], filesystem=source["filesystem"])
    rescored = rows.map_batches(
        rescore_block,
        fn_kwargs={"rescoring": rescoring},
        batch_format="pyarrow",
        batch_size=RESCORE_ROWS,
        num_cpus=0.5,
    )
    rescored.write_parquet(**storage.arrow_target(scored_dir, options), ray_remote_args={"num_cpus": 0.25})


def _reselect(config: ReselectConfig, checked: ReselectPlan, timer: manifest.Timer) -> Outcome:
    """The stage's work: the seeds, the stored codes scored against them, the selection, the report."""
    options = config.storage_options()
    encoding = checked.encoding
    with timer("seeds"):
        seeds_matrix = run_remote(_encode_seed_vectors, _seed_spec(config, checked), checked.sae, checked.seeds,
                                  encoding["max_tokens"], num_cpus=config.cpus, num_gpus=config.gpus)  # fmt: skip
    seeds = checked.seeds
    queries = domain_queries(seeds_matrix, seeds.domains, seeds.ids, checked.scorer, checked.background,
                             checked.feedback)  # fmt: skip
    drivers = domain_drivers(queries.vectors, queries.domains)
    keep = _same_drivers(drivers, checked.source)
    rescoring = Rescoring(queries.vectors, checked.latent_weights, checked.sae.cfg.num_latents, drivers, keep)
    scored_dir, curated_dir = storage.join(config.out, "scored"), storage.join(config.out, "curated")
    with timer("rescore"):
        _rescore(checked, rescoring, scored_dir, options)
    with timer("select"):
        select_and_write(selection_settings(config, checked.seeds, checked.scorer), scored_dir, curated_dir, options)
    source_counts = checked.source.get("counts", {})
    counts = output_counts(options, scored_dir, curated_dir, dict(source_counts.get("rejects_by_reason", {})))
    with timer("report"):
        _write_report(config, checked, counts, timer.timings, drivers, keep)
    logger.info("re-selected %s rows into %s (%s)", counts["curated_rows"], curated_dir, counts["by_domain"])
    extra = {"model": checked.model, "sae": encoding["sae"], "domains": sorted(set(checked.seeds.domains)),
             "driving_latents": drivers.as_dict(), "dtype": checked.source.get("dtype"),
             # What a re-selection of this output needs: the encoding of the codes it carries on, unchanged.
             "encoding": encoding, "weighting": checked.weighting, "scorer": checked.scorer,
             "feedback": checked.feedback,
             "scored_from": {"uri": config.scored, "hash": checked.source.get("hash")}}  # fmt: skip
    return Outcome(counts, extra)


def _write_report(
    config: ReselectConfig,
    checked: ReselectPlan,
    counts: dict[str, Any],
    timings: dict[str, float],
    drivers: DomainDrivers,
    keep_driver_columns: bool,
) -> None:
    from curation.selection.explain_report import TokenSource
    from curation.selection.report import write_report

    notes = [f"selected from the stored codes of {config.scored} (no document was encoded again; its rejects "
             "are counted here and kept there)"]  # fmt: skip
    if not keep_driver_columns:
        notes.append("the seeds' driving latents differ from those the corpus was encoded with, so their "
                     "peak tokens in context are not known here: `python -m jobs.curate` with these seeds "
                     "shows them")  # fmt: skip
    tokens = TokenSource(checked.model, checked.encoding["max_tokens"])
    write_report(config.out, config.storage_options(), checked.seeds, counts, timings, drivers=drivers,
                 tokens=tokens, precision=describe_dtype(checked.source.get("dtype")), notes=notes)  # fmt: skip


def _reads(config: ReselectConfig) -> list[str]:
    """The paths this stage reads: the output selected from, the seeds, and that output's SAE."""
    found = manifest.read_manifest(config.scored, config.storage_options()) or {}
    return [config.scored, config.seeds, str(encoding_of(found)["sae"])]


RESELECT: Stage[ReselectConfig, ReselectPlan] = Stage(STAGE, plan, _reselect, reads=_reads)


def run_reselect(config: ReselectConfig) -> dict[str, Any]:
    """Select again from a curate output's stored codes and return the manifest (core.stage.run_stage)."""
    return run_stage(RESELECT, config)
