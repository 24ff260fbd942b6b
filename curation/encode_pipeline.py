"""The encode pipeline curation and scheduled curation share: the seed vectors and the encoder actors'
spec (with the encode dtype decided once), then corpus shards read, cleaned, tokenized and encoded on Ray
Data into scored rows (`seed_sims` plus the explanation columns) and rejects."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from core import storage
from core.batching import tokenize_batch, tokenize_texts
from core.heap import model_actor_runtime_env
from core.logs import worker_logging
from core.placement import describe_dtype, dtype_decision, requested_device, run_remote
from core.reader import read_corpus
from core.runtime import default_threads
from curation.encode import DocumentEncoder, EncodeDocuments, EncoderSettings
from curation.sae.model import TopKSAE
from curation.seeds import Seeds
from curation.selection.scorers import domain_queries, query_names

if TYPE_CHECKING:
    from curation.selection.curate import CurateConfig, CurationPlan

logger = logging.getLogger(__name__)


def seed_vectors(encoder: DocumentEncoder, seeds: Seeds, max_tokens: int) -> np.ndarray:
    """(seeds, latents) unit vectors of the seeds, encoded by `encoder` as corpus documents are."""
    return encoder.encode(tokenize_texts(encoder.tokenizer, seeds.texts, max_tokens)).numpy()


def _encoder_spec(config: CurateConfig, model: str, sae: TopKSAE, weights: list[float] | None) -> EncoderSettings:
    threads = config.threads or default_threads(config.actors, config.cpus, config.ray_address)
    return EncoderSettings(
        model=model,
        sae_dir=None,
        layer=sae.cfg.layer,
        skip_positions=sae.cfg.skip_positions,
        pooling=config.pooling,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_rows=config.max_batch_rows,
        device=requested_device(config.gpus),
        dtype=config.dtype,
        threads=threads,
        latent_weights=weights,
        storage_options=config.storage_options(),
    )


def _encode_seeds(
    spec: EncoderSettings, sae: TopKSAE, seeds: Seeds, max_tokens: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """The seed vectors, always in float32: a handful of documents, often short, that every corpus document
    is scored against, so bf16 rounding here would move every score (docs/results.md, "bfloat16 encode").
    With them, the encode dtype decided on this worker, one actor's like (core.placement.dtype_decision)."""
    worker_logging()
    encoder = DocumentEncoder(dataclasses.replace(spec, dtype="float32"), sae=sae)
    decision = dtype_decision(spec.dtype, encoder.device)
    return seed_vectors(encoder, seeds, max_tokens), decision


class PreparedEncoder(NamedTuple):
    """What the encode actors are built from: their spec (its dtype decided), the query vectors documents are
    scored against (the seeds' own under the `nearest` scorer: curation/selection/scorers.py), and the record
    of how the dtype was decided (for the manifest)."""

    spec: EncoderSettings
    seeds_matrix: np.ndarray
    dtype: dict[str, Any]


def prepare_encoder(config: CurateConfig, checked: CurationPlan) -> PreparedEncoder:
    """The encoder actors' spec and the (seeds, latents) seed vectors, encoded in a Ray task that holds one
    encoder actor's resources (the driver loads no model); `auto` dtype is decided there, once, so every
    actor runs the same. Ray must be initialised."""
    spec = _encoder_spec(config, checked.model, checked.sae, checked.latent_weights)
    seeds_matrix, decision = run_remote(
        _encode_seeds, spec, checked.sae, checked.seeds, config.max_tokens,
        num_cpus=config.cpus, num_gpus=config.gpus,
    )  # fmt: skip
    logger.info("encode dtype: %s", describe_dtype(decision))
    seeds = checked.seeds
    queries = domain_queries(seeds_matrix, seeds.domains, seeds.ids, config.scorer, checked.background,
                             checked.feedback)  # fmt: skip
    return PreparedEncoder(dataclasses.replace(spec, dtype=decision["dtype"]), queries.vectors, decision)


def encode_shards(
    config: CurateConfig,
    checked: CurationPlan,
    uris: list[str],
    spec: EncoderSettings,
    seeds_matrix: np.ndarray,
    scored_dir: str,
    rejects_dir: str,
    retries: int | None = None,
    progress: Any = None,
) -> None:
    """read -> clean -> tokenize -> encode actor pool -> `scored_dir` (Parquet with `seed_sims`), on Ray Data.

    Rejects land in `rejects_dir`, one file per shard. The stream is ordered, so every run cuts the corpus
    into the same encode batches (see the comment below). Ray must be initialised. `retries` bounds how often
    a tokenize or write task is retried, and an encode actor restarted, after its worker process dies
    (None: Ray Data's default, which retries without end); the read tasks keep the reader's settings.
    `progress`, a `core.progress.ray_counter`, is bumped by the encode actors once per batch.
    """
    import ray

    options = config.storage_options()
    query_domains = query_names(checked.seeds.domains, checked.seeds.ids, config.scorer)[0]
    docs = read_corpus(uris, options, config.clean_config(), rejects_dir)
    task_retries = {} if retries is None else {"max_retries": retries}
    actor_retries = {} if retries is None else {"max_restarts": retries, "max_task_retries": retries}
    tokens = docs.map_batches(
        tokenize_batch,
        fn_kwargs={"model": checked.model, "max_tokens": config.max_tokens, "options": options},
        batch_size=config.batch_size,
        num_cpus=0.25,
        **task_retries,
    )
    scored = tokens.map_batches(
        EncodeDocuments,
        fn_constructor_args=(spec, seeds_matrix, checked.sae, progress, query_domains),
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus,
        num_gpus=config.gpus or None,
        runtime_env=model_actor_runtime_env(),
        batch_size=config.batch_size,
        **actor_retries,
    )
    # A document's padding partners come from its encode batch, and a different partner can move its
    # activations by a rounding error, enough to flip an SAE latent in or out of the top-k. Unordered, the
    # batches are cut from whichever shard's rows arrive first; ordered, they are cut from the corpus in
    # shard order, so scores (and the selection) repeat. The setting is this dataset's own (ray.data copies
    # the DataContext when a dataset is created).
    scored.context.execution_options.preserve_order = True
    # A write task asks for 1 CPU by default: on a 2-CPU node with two batches' actor pools it never starts.
    scored.write_parquet(
        **storage.arrow_target(scored_dir, options), ray_remote_args={"num_cpus": 0.25, **task_retries}
    )
