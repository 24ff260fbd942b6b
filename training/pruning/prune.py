"""Stage 2a: domain-aware structured pruning to a smaller, standard Hugging Face checkpoint.

importance (Taylor on the curated set, or a magnitude / random baseline) -> allocation (how many attention
groups and MLP channels every layer keeps, and which) -> slice -> save (config.json, model.safetensors,
tokenizer files) -> prune_report.json -> manifest.json (last).

**What the ratio counts.** `ratio` is the share of TOTAL parameters removed, embeddings included, as
LLM-Pruner reports it. Embeddings are never pruned, so the decoder layers lose a larger share (about 38%
of SmolLM2's layers for a 30% cut); the report gives both figures.

**Uniform sizes.** Every pruned layer keeps the same number of attention groups and MLP channels, so the
output is described by a standard config (one `num_key_value_heads`, one `intermediate_size`) that
transformers and vLLM load with no custom code. Which groups and channels go is still chosen per layer.
The channel count is a multiple of `channel_multiple` (64 by default) so the matrix products stay on
hardware-friendly shapes; attention keeps whole KV groups, so its sizes are multiples of the head size.

**Allocation between attention and MLP.** The two kinds of structure differ in size (an attention group
of SmolLM2 is 294,912 weights, an MLP channel 1,728), so the cut cannot be split by counting structures.
For every feasible number of kept attention groups, the channel count that brings the total closest to the
target ratio is found; of those candidates the allocation removes the least importance, i.e. the candidate
minimising the summed importance of everything it removes (lowest-scored groups and channels of each
layer). With Taylor scores both kinds of structure are first-order estimates of the same loss change, so
the sums are comparable. `ranking` decides how layers weigh in that sum: `global` compares raw scores
across layers; `per_layer` divides each layer's scores by that layer's total first, so every layer counts
alike. `keep_groups` fixes the number of attention groups instead.

**Model families.** Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 checkpoints are cut
by one slicer that reads each family's description in structures.py: which modules hold q/k/v/o and
gate/up/down, how Phi-3 fuses them, which biases and per-head norms a layer has. A mixture-of-experts or
multimodal checkpoint, or any other type, is refused at validation from its config, with the reason.

**First and last layers.** `keep_first_last` leaves layers 0 and L-1 whole. The model then has layers of
two sizes, which no standard config describes: such an allocation can be applied in memory (e.g. to measure its
perplexity), but it cannot be saved as a standard checkpoint, and the job refuses it at validation.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from core import manifest, models, storage
from core.batching import pad_right, tokenize_texts
from core.domains import check_domain, domains_in, only_domain
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.logs import worker_logging
from core.placement import dtype_decision, run_remote, worker_device
from core.runtime import RunConfig, default_threads
from core.stage import Outcome, Stage, run_stage
from training.pruning.importance import (
    Importance,
    magnitude_importance,
    random_importance,
    removal_losses,
    taylor_importance,
)
from training.pruning.structures import Layout, count_params, layout_of, refusal, slice_structures

logger = logging.getLogger(__name__)

PruneMethod = Literal["taylor", "magnitude", "random"]
Ranking = Literal["global", "per_layer"]
DATA_READS = {"curate": "curated", "reselect": "curated", "split": "train"}
"""--data may name a curate, re-select or split output root: its curated/ or train/ is read (never scored/ or rejects/;
a split's held-out rows stay out of pruning)."""
REPORT = "prune_report.json"
# Not *.safetensors: vLLM loads every safetensors file of a model directory as weights.
IMPORTANCE = "prune_importance.npz"


@dataclass
class PruneConfig(RunConfig):
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {"cpus", "threads"}

    model: str = models.DEFAULT_MODEL
    """Base model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    data: str = ""
    """Curated set: Parquet file or directory with a `text` column, local or s3:// (e.g. <curate out>/curated)."""
    domain: str | None = None
    """Measure importance on this domain's rows only; needed when `data` holds several domains (a curate
    output of a multi-domain seeds file)."""
    out: str = ""
    """Output directory, local or s3://: the pruned model, prune_report.json, manifest.json."""
    ratio: float = 0.30
    """Share of TOTAL parameters to remove (embeddings included, as LLM-Pruner counts); in (0, 1)."""
    method: PruneMethod = "taylor"
    """Importance: taylor (|w * grad| on the curated set), magnitude (|w|), or random."""
    ranking: Ranking = "global"
    """How layers weigh when choosing between attention and MLP: raw scores (global) or per-layer shares."""
    channel_multiple: int = 64
    """MLP sizes are a multiple of this (hardware-friendly shapes)."""
    keep_groups: int | None = None
    """Attention groups (KV heads) every layer keeps; unset chooses the split from importance."""
    removal_docs: int = 8
    """taylor: which attention groups a layer loses is decided by what removing each alone costs, the loss
    measured on the data's first `removal_docs` documents (each cut to 64 tokens; one forward per group); the
    Taylor scores still decide how many groups every layer keeps. 0 decides by the Taylor scores alone,
    which can remove a group the model cannot lose (docs/pruning.md)."""
    keep_first_last: bool = False
    """Leave the first and last layers whole (gives non-uniform sizes; library only, see module docs)."""
    max_docs: int = 256
    """Documents of the curated set used for importance (the first ones, in file order)."""
    max_tokens: int = 256
    """Tokens of each document used for importance."""
    batch_size: int = 8
    """Documents per importance batch."""
    checkpointing: bool = False
    """Activation checkpointing during the importance backward (for big models)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Weights' dtype during importance and in the saved model: float32, bfloat16, or auto (bfloat16 where the
    pruning task's device computes it natively and fast; the manifest records what it became)."""
    seed: int = 0
    """Seed of the random baseline."""
    cpus: float = 1.0
    """CPUs the pruning task reserves (it uses every core of a local machine, int(cpus) on a cluster)."""
    gpus: float = 0.0
    """GPUs the pruning task reserves; > 0 loads the model and measures importance on CUDA."""
    threads: int = 0
    """Torch threads of the pruning task; 0 picks from the machine (local) or from `cpus` (a cluster)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out", self.out, "is required: pass --out DIR")
        check_range("ratio", self.ratio, gt=0.0, lt=1.0, hint="the share of parameters to remove")
        if self.method == "taylor" and not self.data:
            raise ConfigError("data", self.data, "taylor importance needs the curated set: pass --data DIR")
        check_ranges(self, ("channel_multiple", "max_docs", "max_tokens", "batch_size"), ge=1)
        check_range("removal_docs", self.removal_docs, ge=0, hint="0 ranks groups by their Taylor scores")
        check_range("keep_groups", self.keep_groups, ge=1, optional=True, hint="a layer needs attention")
        check_seed("seed", self.seed)
        check_range("cpus", self.cpus, gt=0, hint="fractions are fine")
        check_range("gpus", self.gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the machine")


@dataclass
class Allocation:
    """Which attention groups and MLP channels each layer keeps, and what the cut amounts to."""

    keep_groups: list[list[int]]
    keep_channels: list[list[int]]
    params_before: int
    params_after: int
    decoder_params_before: int
    decoder_params_after: int
    removed_importance: float
    candidates: list[dict]

    @property
    def ratio(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def decoder_ratio(self) -> float:
        return 1.0 - self.decoder_params_after / self.decoder_params_before


def _ranking_scores(importance: Importance, ranking: Ranking) -> tuple[torch.Tensor, torch.Tensor]:
    groups, channels = importance.groups.clone(), importance.channels.clone()
    if ranking == "per_layer":
        totals = (groups.sum(1) + channels.sum(1)).clamp_min(1e-30).unsqueeze(1)
        groups, channels = groups / totals, channels / totals
    return groups, channels


def allocate(
    importance: Importance,
    layout: Layout,
    ratio: float,
    *,
    ranking: Ranking = "global",
    channel_multiple: int = 64,
    keep_groups: int | None = None,
    keep_first_last: bool = False,
) -> Allocation:
    """Uniform sizes for the pruned layers that hit `ratio` of total parameters, removing least importance."""
    pruned = _prunable_layers(layout, keep_first_last)
    params_before = layout.full_params()
    group_scores, channel_scores = _ranking_scores(importance, ranking)
    candidates = _allocation_candidates(
        layout,
        pruned,
        params_before,
        ratio,
        group_scores,
        channel_scores,
        channel_multiple=channel_multiple,
        keep_groups=keep_groups,
    )
    # Hitting the ratio comes first (within one rounding step of the MLP size), then the least importance lost.
    step = channel_multiple * layout.channel_params * len(pruned) / params_before
    best = _least_costly_candidate(candidates, ratio, step)
    # Which groups go: the least costly to remove where that was measured, else the lowest-scored.
    group_order = importance.removal if importance.removal is not None else group_scores
    keep_g, keep_c = _kept_structures(layout, pruned, group_order, channel_scores, best)
    params_after = layout.total_params([len(g) for g in keep_g], [len(c) for c in keep_c])
    decoder_before = params_before - layout.embedding_params() - layout.hidden_size
    return Allocation(
        keep_groups=keep_g,
        keep_channels=keep_c,
        params_before=params_before,
        params_after=params_after,
        decoder_params_before=decoder_before,
        decoder_params_after=params_after - layout.embedding_params() - layout.hidden_size,
        removed_importance=best["removed_importance"],
        candidates=candidates,
    )


def _prunable_layers(layout: Layout, keep_first_last: bool) -> list[int]:
    """The layers the allocation cuts: all of them, or all but the first and last with `keep_first_last`."""
    pruned = [i for i in range(layout.num_layers) if not (keep_first_last and i in (0, layout.num_layers - 1))]
    if not pruned:
        raise ConfigError("keep_first_last", keep_first_last, "leaves no layer to prune; the model is too shallow")
    return pruned


def _group_options(layout: Layout, keep_groups: int | None) -> list[int]:
    """Attention groups per layer an allocation may keep: `keep_groups` when set, all of them when the model's
    attention cannot be cut (Layout.fixed_groups), else any number from 1 to all."""
    if keep_groups is not None and not 1 <= keep_groups <= layout.num_kv_heads:
        raise ConfigError("keep_groups", keep_groups, f"must be in 1..{layout.num_kv_heads} (KV heads per layer)")
    if layout.fixed_groups:
        if keep_groups not in (None, layout.num_kv_heads):
            raise ConfigError("keep_groups", keep_groups, f"this {layout.model_type} model {layout.fixed_groups}")
        return [layout.num_kv_heads]
    return [keep_groups] if keep_groups is not None else list(range(1, layout.num_kv_heads + 1))


def _channel_options(intermediate_size: int, channel_multiple: int) -> list[int]:
    """MLP sizes an allocation may keep: the multiples of `channel_multiple`, and the full size (no MLP cut)."""
    return sorted({c for c in range(channel_multiple, intermediate_size + 1, channel_multiple)} | {intermediate_size})


def _allocation_candidates(
    layout: Layout,
    pruned: list[int],
    params_before: int,
    ratio: float,
    group_scores: torch.Tensor,
    channel_scores: torch.Tensor,
    *,
    channel_multiple: int,
    keep_groups: int | None,
) -> list[dict]:
    """Per feasible number of kept attention groups, the MLP size that brings the total closest to `ratio`,
    with the ratio it achieves and the importance it removes (the lowest-scored structures of each layer)."""
    full = layout.layer_params(layout.num_kv_heads, layout.intermediate_size)
    target_after = params_before * (1.0 - ratio)
    fixed = params_before - full * len(pruned)  # embeddings, final norm, untouched layers
    sorted_groups = group_scores[pruned].sort(dim=1).values.sum(0)  # (kv_heads,) ascending per layer, summed
    sorted_channels = channel_scores[pruned].sort(dim=1).values.sum(0)
    group_options = _group_options(layout, keep_groups)
    channel_options = _channel_options(layout.intermediate_size, channel_multiple)
    candidates = []
    for groups in group_options:
        per_layer_budget = (target_after - fixed) / len(pruned) - layout.layer_params(groups, 0)
        channels = min(channel_options, key=lambda c: abs(c * layout.channel_params - per_layer_budget))
        after = fixed + len(pruned) * layout.layer_params(groups, channels)
        removed = float(sorted_groups[: layout.num_kv_heads - groups].sum())
        removed += float(sorted_channels[: layout.intermediate_size - channels].sum())
        candidates.append(
            {
                "groups": groups,
                "channels": channels,
                "ratio": 1.0 - after / params_before,
                "removed_importance": removed,
            }
        )
    return candidates


def _least_costly_candidate(candidates: list[dict], ratio: float, step: float) -> dict:
    """Of the candidates within half a rounding `step` of `ratio`, the one removing the least importance."""
    feasible = [c for c in candidates if abs(c["ratio"] - ratio) <= step / 2 + 1e-12]
    if not feasible:
        closest = min(candidates, key=lambda c: abs(c["ratio"] - ratio))
        raise ConfigError(
            "ratio", ratio, f"not reachable with uniform sizes; the closest allocation removes {closest['ratio']:.3f}"
        )
    return min(feasible, key=lambda c: c["removed_importance"])


def _kept_structures(
    layout: Layout, pruned: list[int], group_scores: torch.Tensor, channel_scores: torch.Tensor, best: dict
) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the attention groups and MLP channels kept: a pruned layer keeps its highest-scored ones
    (in index order; `group_scores` may be removal losses), an untouched layer all of them."""
    keep_g, keep_c = [], []
    for layer in range(layout.num_layers):
        if layer in pruned:
            keep_g.append(sorted(group_scores[layer].argsort(descending=True)[: best["groups"]].tolist()))
            keep_c.append(sorted(channel_scores[layer].argsort(descending=True)[: best["channels"]].tolist()))
        else:
            keep_g.append(list(range(layout.num_kv_heads)))
            keep_c.append(list(range(layout.intermediate_size)))
    return keep_g, keep_c


def domain_batches(
    texts: list[str], tokenizer, max_tokens: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch, tokens) ids and masks of the texts, sorted by length so little padding is computed."""
    token_lists = [ids for ids in tokenize_texts(tokenizer, texts, max_tokens) if len(ids) >= 2]
    token_lists.sort(key=len)
    for start in range(0, len(token_lists), batch_size):
        yield pad_right(token_lists[start : start + batch_size], tokenizer.pad_token_id)


def read_texts(
    data: str, max_docs: int, options: storage.StorageOptions | None = None, domain: str | None = None
) -> list[str]:
    """The first `max_docs` non-empty texts of a Parquet file or directory (of `domain`'s rows, when given);
    empty data fails with the fix."""
    try:
        table = only_domain(storage.read_parquet(data, options), domain)
    except FileNotFoundError:
        raise ConfigError(
            "data", data, "holds no *.parquet file; pass the curated/ directory of a curate run"
        ) from None
    if "text" not in table.column_names:
        raise ConfigError("data", data, f"has no `text` column (columns: {', '.join(table.column_names)})")
    texts = [t for t in table.column("text").to_pylist() if t and t.strip()][:max_docs]
    if not texts:
        raise ConfigError("data", data, "holds no non-empty text; curate a domain set first")
    return texts


def _domain_data(config: PruneConfig, options: storage.StorageOptions) -> tuple[list[storage.FileInfo], list[str]]:
    """The curated set's files (for the manifest hash) and its texts (for taylor importance). A curate or split
    output root is read through its manifest; its scored/ and rejects/ never are."""
    if not config.data:
        return [], []
    inputs = manifest.input_files(config.data, field="data", reads=DATA_READS, options=options)
    source = manifest.resolve_input(config.data, field="data", reads=DATA_READS, options=options)
    parquet = [info for info in inputs if info.uri.endswith(".parquet")]
    check_domain(config.domain, domains_in(parquet, options), config.data)
    texts = read_texts(source, config.max_docs, options, config.domain) if config.method == "taylor" else []
    return inputs, texts


REMOVAL_TOKENS = 64
"""Tokens of each document the removal losses read: a group the model cannot lose shows on short text too
(SmolLM2's costs 3.0 nats per token on 8 x 64 tokens, 3.0 on 8 x 128), at a fraction of the forwards' cost."""


def compute_importance(
    model: nn.Module, layout: Layout, config: PruneConfig, texts: list[str], tokenizer
) -> Importance:
    if config.method == "magnitude":
        return magnitude_importance(model, layout)
    if config.method == "random":
        return random_importance(layout, config.seed)
    batches = domain_batches(texts, tokenizer, config.max_tokens, config.batch_size)
    importance = taylor_importance(model, layout, batches, checkpointing=config.checkpointing)
    if config.removal_docs:
        tokens = min(config.max_tokens, REMOVAL_TOKENS)
        sample = domain_batches(texts[: config.removal_docs], tokenizer, tokens, config.batch_size)
        importance.removal = removal_losses(model, layout, sample)
    return importance


def prune_report(config: PruneConfig, allocation: Allocation, importance: Importance, layout: Layout) -> dict:
    removed = []
    for layer, (groups, channels) in enumerate(zip(allocation.keep_groups, allocation.keep_channels, strict=True)):
        gone = sorted(set(range(layout.num_kv_heads)) - set(groups))
        removed.append(
            {
                "layer": layer,
                "kv_groups_removed": gone,
                "query_heads_removed": [
                    g * layout.heads_per_group + h for g in gone for h in range(layout.heads_per_group)
                ],
                "mlp_channels_removed": layout.intermediate_size - len(channels),
                "mlp_channels_kept": len(channels),
            }
        )
    kept_importance = sum(float(importance.groups[i, g].sum()) for i, g in enumerate(allocation.keep_groups))
    kept_importance += sum(float(importance.channels[i, c].sum()) for i, c in enumerate(allocation.keep_channels))
    total_importance = float(importance.groups.sum() + importance.channels.sum())
    middle_groups = allocation.keep_groups[len(allocation.keep_groups) // 2]
    return {
        "model_type": layout.model_type,
        "method": config.method,
        "ranking": config.ranking,
        "ratio_asked": config.ratio,
        "ratio_achieved": round(allocation.ratio, 6),
        "decoder_ratio_achieved": round(allocation.decoder_ratio, 6),
        "params_before": allocation.params_before,
        "params_after": allocation.params_after,
        "decoder_params_before": allocation.decoder_params_before,
        "decoder_params_after": allocation.decoder_params_after,
        "sizes_before": {
            "num_attention_heads": layout.num_heads,
            "num_key_value_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim,
            "intermediate_size": layout.intermediate_size,
        },
        "sizes_after": {
            "num_attention_heads": len(middle_groups) * layout.heads_per_group,
            "num_key_value_heads": len(middle_groups),
            "head_dim": layout.head_dim,
            "intermediate_size": len(allocation.keep_channels[len(allocation.keep_channels) // 2]),
        },
        "attention_kept_whole": layout.fixed_groups,
        "removed_per_layer": removed,
        "allocation_candidates": allocation.candidates,
        "group_removal_loss": None
        if importance.removal is None
        else [[round(float(v), 6) for v in row] for row in importance.removal],
        "importance": {
            **importance.summary(),
            "share_kept": round(kept_importance / total_importance, 6) if total_importance else None,
        },
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PrunePlan:
    """The validated run: the base model's layout, the curated texts importance is measured on, the files
    they came from and the run's digest."""

    layout: Layout
    texts: list[str]
    inputs: list[storage.FileInfo]
    digest: str


def plan(config: PruneConfig) -> PrunePlan:
    """Check the model (from its config, no weights) and read the curated texts, before Ray starts."""
    layout = _checked_layout(config)
    # Which structures go needs the scores; whether the sizes can hit the ratio does not: with all scores equal,
    # an unreachable ratio or an impossible keep_groups fails here instead of in the task, after the load.
    allocate(
        Importance(
            torch.zeros(layout.num_layers, layout.num_kv_heads, dtype=torch.float64),
            torch.zeros(layout.num_layers, layout.intermediate_size, dtype=torch.float64),
        ),
        layout,
        config.ratio,
        ranking=config.ranking,
        channel_multiple=config.channel_multiple,
        keep_groups=config.keep_groups,
    )
    inputs, texts = _domain_data(config, config.storage_options())
    model = models.model_inputs(config.model, config.storage_options())  # a changed base model prunes again
    return PrunePlan(layout, texts, inputs, config.digest([*inputs, *model]))


def _prune(config: PruneConfig, checked: PrunePlan, timer: manifest.Timer) -> Outcome:
    """The model is loaded, scored, sliced and saved in one Ray task that holds `cpus` and `gpus`
    (docs/design.md, "Placement"); the driver only plans."""
    threads = config.threads or default_threads(1, config.cpus, config.ray_address)
    timings, counts, params = run_remote(
        _prune_and_save, config.for_workers(), checked.layout, checked.texts, threads,
        num_cpus=config.cpus, num_gpus=config.gpus,
    )  # fmt: skip
    timer.timings.update(timings)
    return Outcome(counts, {**params, "report": REPORT})


PRUNE: Stage[PruneConfig, PrunePlan] = Stage("prune", plan, _prune, reads=lambda config: [config.model, config.data])


def run_pruning(config: PruneConfig) -> dict[str, Any]:
    """Prune and return the manifest (core.stage.run_stage: skips a finished run); the report is in
    `out/prune_report.json` (:func:`read_report`)."""
    return run_stage(PRUNE, config)


def read_report(out: str, options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """The prune report a finished pruning output holds."""
    return storage.read_json(storage.join(out, REPORT), options)


def _prune_and_save(config: PruneConfig, layout: Layout, texts: list[str], threads: int) -> tuple:
    """The model work of the stage, on this task's device: (timings, counts, parameter counts)."""
    worker_logging()
    torch.set_num_threads(threads)
    options = config.storage_options()
    timer = manifest.Timer()
    device = worker_device(config.gpus)
    decision = dtype_decision(config.dtype, device)
    with timer("load"):
        model = models.load_model(config.model, dtype=getattr(torch, decision["dtype"]), device=device, options=options)
        tokenizer = models.load_tokenizer(config.model, options)
    _check_described(model, layout, config.model)
    with timer("importance"):
        importance = compute_importance(model, layout, config, texts, tokenizer)
    allocation = allocate(
        importance,
        layout,
        config.ratio,
        ranking=config.ranking,
        channel_multiple=config.channel_multiple,
        keep_groups=config.keep_groups,
    )
    with timer("slice"):
        slice_structures(model, allocation.keep_groups, allocation.keep_channels)
    if count_params(model) != allocation.params_after:
        raise RuntimeError(f"sliced model has {count_params(model)} parameters, not {allocation.params_after}")
    report = prune_report(config, allocation, importance, layout)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    with timer("save"):
        save_pruned(model, tokenizer, config.out, options)
        storage.write_json_atomic(storage.join(config.out, REPORT), report, options)
        storage.write_bytes_atomic(storage.join(config.out, IMPORTANCE), importance.to_npz(), options)
    _log_pruned(config.model, allocation, report)
    counts = {"docs": len(texts), "batches": importance.batches, "tokens": importance.tokens}
    extra = {"params_before": allocation.params_before, "params_after": allocation.params_after, "dtype": decision}
    return timer.timings, counts, extra


def _check_described(model: nn.Module, layout: Layout, name: str) -> None:
    """Refuse a loaded model whose parameters are not the ones its family's description counts: slicing it
    could leave a structure's weights behind in a module the description does not name."""
    if (found := count_params(model)) != (described := layout.full_params()):
        raise ConfigError(
            "model",
            name,
            f"holds {found} parameters where the {layout.model_type} description counts {described}: "
            "its modules are not the ones pruning slices for this family",
        )


def _checked_layout(config: PruneConfig) -> Layout:
    """The base model's layout, once the run is known to be one this stage can save as a standard checkpoint."""
    if config.keep_first_last:
        raise ConfigError(
            "keep_first_last", True, "gives layers of two sizes, which no standard config describes; use the library"
        )
    # An unsupported model type fails here, from config.json or GGUF metadata, before any weights load; a config
    # of a supported type that still cannot be sliced (experts, a nested text model) fails in layout_of.
    options = config.storage_options()
    model_type = _model_type(config.model, options)
    if reason := refusal(model_type):
        raise ConfigError("model", config.model, f"a {model_type!r} model {reason}")
    try:
        return layout_of(_read_config(config.model, options))
    except ConfigError as error:
        raise ConfigError("model", config.model, f"a {error.value!r} model {error.fix}") from None


def _log_pruned(model: str, allocation: Allocation, report: dict) -> None:
    logger.info(
        "pruned %s: %d -> %d parameters (%.1f%% of total, %.1f%% of the decoder layers); %d heads / %d KV, MLP %d",
        model,
        allocation.params_before,
        allocation.params_after,
        100 * allocation.ratio,
        100 * allocation.decoder_ratio,
        report["sizes_after"]["num_attention_heads"],
        report["sizes_after"]["num_key_value_heads"],
        report["sizes_after"]["intermediate_size"],
    )


def _model_type(model: str, options: storage.StorageOptions | None = None) -> str:
    """The base model's `model_type`, from its config.json (a GGUF file: its header); no weights are read."""
    if models.model_ref(model).kind in ("embedded", "gguf"):
        return models.model_info(model).model_type
    return str(models.model_config(model, options).get("model_type", ""))


def _read_config(model: str, options: storage.StorageOptions | None = None):
    """The base model's transformers config, built from its config.json alone (a model on S3 or the Hub is
    not downloaded, a GGUF file not converted, on the driver)."""
    from transformers import AutoConfig

    values = dict(models.model_config(model, options))
    return AutoConfig.for_model(values.pop("model_type", ""), **values)


def save_pruned(model: nn.Module, tokenizer, out: str, options: storage.StorageOptions | None = None) -> None:
    """config.json + model.safetensors + tokenizer files, to a local or remote directory."""
    staging = tempfile.mkdtemp(prefix="finescope-pruned-")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "config.json")) as handle:
            json.load(handle)  # written and parseable before it is published
        storage.upload_dir(staging, out, options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "PruneConfig",
    "Allocation",
    "allocate",
    "read_report",
    "run_pruning",
    "read_texts",
    "domain_batches",
    "save_pruned",
]
