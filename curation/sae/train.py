"""Train the Top-K SAE on corpus activations streamed through Ray Data.

read -> clean -> tokenize -> activations (truncated forward at layer L, the chosen coordinates,
positions that count only) -> shuffled batches -> `train_sae` in the trainer task -> SAE directory plus
manifest. Coordinates are chosen first, on the seeds (`jacobian`, the paper's) or on a calibration
sample of the corpus.

The SAE is a function of the config (its `seed` included) and the inputs: every random draw comes from a
generator seeded with `seed`, and the activation stream keeps the corpus order (sorted shards, rows in file
order), so the token budget, the normaliser's sample and the shuffles see the same rows in the same order
in every run. docs/curation.md ("Determinism") says under which conditions the bytes are identical.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from core import manifest, models, storage
from core.batching import tokenize_batch, tokenize_texts
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.heap import model_actor_runtime_env
from core.logs import worker_logging
from core.placement import decide_dtype, record_model_load, requested_device, run_remote, worker_device
from core.progress import Progress
from core.reader import DOC, CleanConfig, iter_shard, read_corpus
from core.runtime import RunConfig, default_threads
from core.stage import Outcome, Stage, run_stage
from curation.encode import DocumentEncoder, EncoderSettings, TokenActivations
from curation.latent_weights import save_corpus_sample
from curation.sae.coords import CoordSelector, select_coords, unmeasured_coords
from curation.sae.model import SAEConfig, TopKSAE, TrainingDiverged, train_sae
from curation.sae.replay import replay_batches
from curation.seeds import load_seeds

logger = logging.getLogger(__name__)
ACTIVATION_BLOCK_BYTES = 8 * 1024 * 1024
"""Largest block of activation rows an activation actor hands on: the trainer starts, and memory is freed, sooner."""


@dataclass
class TrainSAEConfig(RunConfig):
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "actors",
        "cpus",
        "threads",
        "trainer_cpus",
        "replay_dir",
    }

    corpus: list[str] = field(default_factory=list)
    """Corpus shards to train on: paths, directories or globs, local or s3://."""
    out: str = ""
    """Output SAE directory, local or s3://: cfg.json, sae.safetensors, manifest.json."""
    model: str = models.DEFAULT_MODEL
    """Base model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    layer: int = 15
    """Decoder layer (0-based) whose output the SAE reads; only layers 0..layer are run."""
    seeds: str | None = None
    """Seed examples (JSONL) on which `jacobian` coordinates are measured; without it, a corpus sample."""
    coords: CoordSelector = "all"
    """The SAE's input coordinates: all (the best measured, docs/results.md), or K chosen by jacobian (the
    paper's: most input-sensitive on the seeds) or magnitude."""
    num_coords: int = 96
    """Input coordinates K for jacobian or magnitude (the paper's best was 96); ignored for coords=all."""
    expansion_factor: int = 4
    """SAE latents per input coordinate: 4 (2,304 latents on all of SmolLM2's 576 coordinates) selected
    better than 16 and trains 4x faster (docs/results.md, "Curation quality"); the paper's SAE is wider."""
    k: int = 32
    """Active latents per token."""
    max_train_tokens: int = 400_000
    """Training tokens (activations) to draw from the corpus."""
    epochs: int = 4
    """Passes over the drawn tokens; above 1 they are replayed from a file on the trainer's local disk
    (max_train_tokens x K x 4 bytes, in `replay_dir`), so the trainer's memory does not grow with the budget."""
    batch_tokens: int = 1024
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate; unset uses Gao et al.'s width-scaled default."""
    max_tokens: int = 256
    """Tokens of each document that are read."""
    calibration_docs: int = 64
    """Corpus documents used to choose coordinates when no seeds are given."""
    stats_docs: int = 2048
    """Corpus documents (the first ones) on which each latent's document frequency is measured after
    training, for curation's rarity weighting (curation/latent_weights.py); 0 skips it."""
    actors: int = 1
    """Model actors computing activations."""
    cpus: float = 1.0
    """CPUs each activation actor reserves."""
    gpus: float = 0.0
    """GPUs each activation actor reserves; > 0 runs it on CUDA."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The truncated forward's precision when computing activations: auto is bfloat16 where the actor's
    device computes it natively, float32 elsewhere (the SAE trains in float32 either way; coordinates are
    always measured in float32)."""
    trainer_cpus: float = 0.5
    """CPUs the SAE trainer task reserves (it uses every core of a local machine, int(trainer_cpus) on a cluster)."""
    trainer_gpus: float = 0.0
    """GPUs the SAE trainer task reserves; > 0 trains on CUDA."""
    threads: int = 0
    """Torch threads per actor; 0 picks from the machine (local) or cpus (cluster)."""
    replay_dir: str | None = None
    """Local directory, on the trainer's node, for the replayed activations (epochs > 1); unset: the system's
    temporary directory."""
    seed: int = 0
    """Seed of every random draw: the Jacobian probes, the SAE's initial weights, the shuffles."""

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus:
            raise ConfigError("corpus", self.corpus, "is required: pass --corpus PATH_OR_GLOB")
        check_seed("seed", self.seed)
        if not self.out:
            raise ConfigError("out", self.out, "is required: pass --out DIR")
        positive = ("num_coords", "expansion_factor", "k", "max_train_tokens", "epochs", "batch_tokens")
        check_ranges(self, (*positive, "max_tokens", "calibration_docs", "actors"), ge=1)
        check_range("stats_docs", self.stats_docs, ge=0, hint="0 skips the latent statistics")
        check_range("layer", self.layer, ge=0, hint="a 0-based decoder layer index")
        check_range("lr", self.lr, gt=0, optional=True, hint="unset uses the width-scaled default")
        check_range("cpus", self.cpus, gt=0, hint="fractions are fine")
        check_range("gpus", self.gpus, ge=0)
        check_range("trainer_cpus", self.trainer_cpus, gt=0, hint="fractions are fine")
        check_range("trainer_gpus", self.trainer_gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the machine")


@dataclass
class TrainSAEPlan:
    """What validation found: the base model's shape, the files read, and the run's digest."""

    info: models.ModelInfo
    inputs: list[storage.FileInfo]
    digest: str


def plan(config: TrainSAEConfig) -> TrainSAEPlan:
    """Validate against the model and the storage before any Ray work; reads no weights."""
    options = config.storage_options()
    info = models.model_info(config.model, options)
    if config.layer >= info.num_layers:
        raise ConfigError(
            "layer", config.layer, f"{config.model} has {info.num_layers} layers: use 0..{info.num_layers - 1}"
        )
    if config.coords != "all" and not 1 <= config.num_coords <= info.hidden_size:
        raise ConfigError(
            "num_coords", config.num_coords, f"must be in 1..{info.hidden_size} (the hidden size of {config.model})"
        )
    d_in = info.hidden_size if config.coords == "all" else config.num_coords
    SAEConfig(d_in=d_in, expansion_factor=config.expansion_factor, k=config.k)  # fails fast, naming the field
    if config.seeds:
        load_seeds(config.seeds, options)
    inputs = manifest.corpus_files(config.corpus, options)
    extra = storage.expand(config.seeds, options, config_field="seeds") if config.seeds else []
    return TrainSAEPlan(info, inputs, config.digest([*inputs, *extra, *models.model_inputs(config.model, options)]))


def calibration_texts(config: TrainSAEConfig, inputs: list[storage.FileInfo]) -> list[str]:
    """The seeds, or else the first documents of the corpus, to choose coordinates on."""
    if config.seeds:
        return load_seeds(config.seeds, config.storage_options()).texts
    return corpus_texts(config, inputs, config.calibration_docs)


def corpus_texts(config: TrainSAEConfig, inputs: list[storage.FileInfo], limit: int) -> list[str]:
    """The corpus's first `limit` clean documents, in input order."""
    options = config.storage_options()
    texts: list[str] = []
    for info in inputs:
        for kind, row in iter_shard(info.uri, options, CleanConfig()):
            if kind == DOC:
                texts.append(row["text"])
            if len(texts) >= limit:
                return texts
    return texts


def _encoder_spec(config: TrainSAEConfig) -> EncoderSettings:
    """The activation encoder's spec, reading every coordinate until they are chosen."""
    threads = config.threads or default_threads(config.actors, config.cpus, config.ray_address)
    device = requested_device(config.gpus)
    return EncoderSettings(
        model=config.model, sae_dir=None, layer=config.layer, device=device, dtype=config.dtype, threads=threads,
        storage_options=config.storage_options(),
    )  # fmt: skip


def _choose_coords(config: TrainSAEConfig, spec: EncoderSettings, inputs: list[storage.FileInfo]) -> list[int]:
    """The SAE's input coordinates, measured over the seeds or a corpus sample (in a task holding an actor's
    resources: see run_train_sae)."""
    worker_logging()
    # Finite differences need float32 whatever precision the activations are computed in.
    encoder = DocumentEncoder(dataclasses.replace(spec, dtype="float32"))
    texts = calibration_texts(config, inputs)
    token_lists = tokenize_texts(encoder.tokenizer, texts, config.max_tokens)
    return select_coords(encoder, token_lists, config.coords, config.num_coords, seed=config.seed)


def activation_dataset(config: TrainSAEConfig, spec: EncoderSettings, inputs: list[storage.FileInfo]) -> Any:
    """read -> clean -> tokenize -> activation actors: a Ray Dataset of `act` rows, the first
    `max_train_tokens` counted tokens in corpus order, in blocks of at most `ACTIVATION_BLOCK_BYTES`.

    The stream is ordered: the rows come in corpus order whichever task finishes first, so `.limit()` keeps
    the same leading rows and the seeded local shuffle sees the same sequence in every run. Ray must be
    initialised.
    """
    import ray

    options = config.storage_options()
    docs = read_corpus([i.uri for i in inputs], options, CleanConfig(), storage.join(config.out, "rejects"))
    activations = (
        docs.map_batches(
            tokenize_batch,
            fn_kwargs={"model": config.model, "max_tokens": config.max_tokens, "options": options},
            num_cpus=0.25,
        )
        .map_batches(
            TokenActivations,
            fn_constructor_args=(spec,),
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.cpus,
            num_gpus=config.gpus or None,
            runtime_env=model_actor_runtime_env(),
            batch_size=128,
        )
        .limit(config.max_train_tokens)
    )
    # Both settings land in this dataset's own DataContext (ray.data copies the context when a dataset is
    # created), so other datasets of the process stream as they did.
    activations.context.execution_options.preserve_order = True
    # One activation row is d_in x 4 bytes (2.3 KB on SmolLM2). At Ray Data's default of 128 MiB per output
    # block an actor computed ~57k tokens before the trainer saw the first, and handed them on in bursts.
    activations.context.target_max_block_size = ACTIVATION_BLOCK_BYTES
    return activations


def _activation_stream(
    config: TrainSAEConfig, spec: EncoderSettings, inputs: list[storage.FileInfo]
) -> Iterator[torch.Tensor]:
    """`activation_dataset` as locally shuffled batches of `batch_tokens` activations."""
    return (
        batch["act"]
        for batch in activation_dataset(config, spec, inputs).iter_torch_batches(
            batch_size=config.batch_tokens,
            local_shuffle_buffer_size=16 * config.batch_tokens,
            local_shuffle_seed=config.seed,
            drop_last=False,
        )
    )


def _train_and_save(
    config: TrainSAEConfig, spec: EncoderSettings, inputs: list[storage.FileInfo], sae_config: SAEConfig, threads: int
) -> dict[str, Any]:
    """Stream activations, train the SAE on this task's device and write it to `config.out`; its metrics."""
    from ray.data import DataContext

    worker_logging()
    DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(threads)
    device = worker_device(config.trainer_gpus)
    stream = _activation_stream(config, spec, inputs)
    with Progress("sae train", config.max_train_tokens * config.epochs, "tokens") as progress:
        batches = replay_batches(stream, config.epochs, config.batch_tokens, config.seed, progress, config.replay_dir)
        try:
            sae, metrics = train_sae((batch.to(device) for batch in batches), sae_config, seed=config.seed)
        except TrainingDiverged as error:
            fix = "lower the learning rate (unset uses the width-scaled default) and train again; nothing was written"
            raise ConfigError("lr", config.lr, f"SAE training diverged: {error}; {fix}") from None
    record_model_load("sae-trainer", sae.device)
    with tempfile.TemporaryDirectory() as staging:
        sae.save(staging)
        storage.upload_dir(staging, config.out, config.storage_options())
    return metrics


def _measure_latent_stats(config: TrainSAEConfig, spec: EncoderSettings, inputs: list[storage.FileInfo]) -> int:
    """Encode the corpus's first `stats_docs` documents with the trained SAE and store, beside the SAE, in how
    many each latent fires and their pooled codes, the corpus sample of the learned scorers
    (curation/latent_weights.py); the number of documents measured."""
    worker_logging()
    options = config.storage_options()
    sae = TopKSAE.load(storage.local_copy(config.out, options))
    encoder = DocumentEncoder(spec, sae=sae)
    texts = corpus_texts(config, inputs, config.stats_docs)
    pooled = encoder.encode_codes(tokenize_texts(encoder.tokenizer, texts, config.max_tokens)).pooled
    return save_corpus_sample(config.out, pooled, spec.pooling, options).docs


def _sae_config(config: TrainSAEConfig, info: models.ModelInfo, coords: list[int]) -> SAEConfig:
    return SAEConfig(
        d_in=len(coords),
        expansion_factor=config.expansion_factor,
        k=config.k,
        layer=config.layer,
        coords=coords,
        coord_selector=config.coords,
        base_model={"name": config.model, "num_layers": info.num_layers, "hidden_size": info.hidden_size},
    )


def _train(config: TrainSAEConfig, checked: TrainSAEPlan, timer: manifest.Timer) -> Outcome:
    """Choose coordinates, train, measure latent statistics; core.stage.run_stage does the rest."""
    info, inputs = checked.info, checked.inputs
    spec = _encoder_spec(config)
    decision = decide_dtype(spec.dtype, spec.device, spec.threads, num_cpus=config.cpus,
                            num_gpus=config.gpus)  # fmt: skip
    spec = dataclasses.replace(spec, dtype=decision["dtype"])  # every activation actor runs the recorded dtype
    # The driver loads no model: coordinates, when there are any to measure, are measured in a task holding
    # one activation actor's resources, and the SAE trains in a task holding the trainer's, which streams
    # the activations itself.
    shipped = config.for_workers()
    coords = unmeasured_coords(config.coords, info.hidden_size)
    if coords is None:
        with timer("coords"):
            coords = run_remote(_choose_coords, shipped, spec, inputs, num_cpus=config.cpus, num_gpus=config.gpus)
    spec = dataclasses.replace(spec, coords=coords)
    sae_config = _sae_config(config, info, coords)
    threads = default_threads(1, config.trainer_cpus, config.ray_address)
    with timer("train"):
        metrics = run_remote(
            _train_and_save, shipped, spec, inputs, sae_config, threads,
            num_cpus=config.trainer_cpus, num_gpus=config.trainer_gpus,
        )  # fmt: skip
    if config.stats_docs:
        with timer("latent_stats"):
            metrics["stats_docs"] = run_remote(
                _measure_latent_stats, shipped, spec, inputs,
                num_cpus=config.cpus, num_gpus=config.gpus,
            )  # fmt: skip
    counts = {"train_tokens_drawn": metrics["tokens"] // max(config.epochs, 1), **metrics}
    logger.info(
        "SAE written to %s: fvu=%.3f dead=%.3f %.0f tokens/s",
        config.out, metrics["fvu"], metrics["dead_fraction"], metrics["tokens_per_s"],
    )  # fmt: skip
    return Outcome(counts, {"coords": coords, "dtype": decision})


TRAIN_SAE: Stage[TrainSAEConfig, TrainSAEPlan] = Stage(
    "train_sae", plan, _train, reads=lambda config: [*config.corpus, config.seeds or "", config.model]
)


def run_train_sae(config: TrainSAEConfig) -> dict[str, Any]:
    """Train an SAE and write it to `config.out`; returns the manifest (core.stage.run_stage)."""
    return run_stage(TRAIN_SAE, config)
