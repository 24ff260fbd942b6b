"""A scheduled-curation spec: its settings (:class:`ScheduleSpec`, the fields of `jobs.curate` plus
scheduling ones) and its identity, which binds an output root to one way of scoring
(docs/scheduled-curation.md, "A spec's identity")."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

from core import cli, storage
from core.errors import ConfigError, check_range, check_ranges
from core.storage import StorageOptions
from curation.latent_weights import SAMPLE_FILE, STATS_FILE
from curation.sae.model import CONFIG_FILE, WEIGHTS_FILE
from curation.selection.curate import CurateConfig
from curation.selection.scorers import LEARNED


@dataclass
class ScheduleSpec(CurateConfig):
    """One domain spec for scheduled curation; `out` is its output root (catalog, shards, snapshots)."""

    name: str = ""
    """A name for status lines; defaults to the output root's last path component."""
    shards_per_round: int = 4
    """Shards claimed and run through one Ray Data pipeline at a time; each is committed when its round ends."""
    max_shards_per_batch: int = 0
    """Shards one batch processes at most (0: every due shard)."""
    lease_seconds: float = 900.0
    """How long a claim lasts without renewal; the holder renews it every third of that."""
    max_attempts: int = 3
    """Failed attempts after which a shard is left alone (until its file changes)."""
    max_bad_line_fraction: float = 0.5
    """A shard with more than this fraction of lines that are not JSON objects is failed as not JSONL."""
    interval_s: float = 600.0
    """Seconds between batches when `jobs.schedule` loops (without --once)."""
    keep_snapshots: int = 5
    """Snapshot versions kept; older ones are deleted after a new one is published."""
    settle_seconds: float = 0.0
    """A shard modified less than this many seconds before the batch lists it is left for a later batch: it
    may still be being written (a local copy in progress). 0: claim it at once. Either way, a shard whose
    size or mtime changed while it was processed is not recorded, and a later batch processes it again."""
    task_retries: int = 2
    """Times a round's tokenize or write task is retried, or an encode actor restarted, after its worker
    process dies (OOM, segfault); past that the round fails and its shards are run one at a time."""
    round_timeout_s: float = 3600.0
    """Time budget of one round's Ray Data pipeline. Past it the round is stopped and its shards are run
    one at a time, each with the same budget; a shard that alone runs past it is recorded failed. 0: none."""
    storage_backoff_s: float = 60.0
    """After a storage error on a shard (its reads kept failing: an outage, not its data), batches leave it
    alone this many seconds, doubled for each further storage error in a row (up to 64 times). Never
    counted as an attempt; the batch that met the error claims no further shards. 0: the next batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name:
            self.name = posixpath.basename(self.out.rstrip("/")) or self.out
        check_ranges(self, ("shards_per_round", "max_attempts", "keep_snapshots"), ge=1)
        check_range("max_shards_per_batch", self.max_shards_per_batch, ge=0, hint="0: no limit")
        # A NaN or infinite lease never expires and compares false with every clock: claims would race.
        check_range("lease_seconds", self.lease_seconds, gt=0)
        check_range("interval_s", self.interval_s, ge=0)
        check_range("max_bad_line_fraction", self.max_bad_line_fraction, ge=0.0, le=1.0)
        check_range("settle_seconds", self.settle_seconds, ge=0)
        check_range("task_retries", self.task_retries, ge=0)
        check_range("round_timeout_s", self.round_timeout_s, ge=0, hint="0: no budget")
        check_range("storage_backoff_s", self.storage_backoff_s, ge=0, hint="0: the next batch retries")


def load_schedule_spec(path: str) -> ScheduleSpec:
    """A spec from its YAML file; unknown keys and bad values fail naming the field."""
    return cli.from_mapping(ScheduleSpec, cli.load_yaml(path, flag="--spec"), origin=path)


# Identity ------------------------------------------------------------------------------------------


# Fields of a spec that change no score, so a spec's output root outlives changes to them. Every other field
# of `content()` is part of the identity: a new field is too, unless it is listed here (and the test that
# pins this list is changed with it).
NOT_SCORED = frozenset(
    {
        # Where the shards come from and where the output goes: the corpus prefix grows, `out` is the root
        # the identity is bound to, and the seeds and the SAE count by their content digests, not their paths.
        "corpus", "out", "seeds", "sae", "name",
        # How the encode runs. These move a score by rounding at most, as which shards share a round does.
        "gpus", "batch_size", "max_batch_tokens", "max_batch_rows",
        # Scheduling: when, how many and how often shards are tried, and what a batch keeps.
        "shards_per_round", "max_shards_per_batch", "lease_seconds", "max_attempts", "max_bad_line_fraction",
        "interval_s", "keep_snapshots", "settle_seconds", "task_retries", "round_timeout_s", "storage_backoff_s",
    }
)  # fmt: skip


def _digest(uri: str, options: StorageOptions | None) -> str:
    hasher = hashlib.sha256()
    with storage.open_read(uri, options) as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def spec_identity(spec: ScheduleSpec, model: str) -> dict[str, Any]:
    """What a spec's scores depend on: every setting of `content()` but `NOT_SCORED`, with `model` the model
    the batch encodes with (the SAE's base model when the spec leaves it unset), and the content digests of
    the seeds and of the SAE's files.

    `latent_stats.json` counts where `weighting: idf` reads it. `dtype: auto` stays `auto` here; what it
    becomes is bound to the root by :func:`bind_dtype` when the first batch decides it.
    """
    options = spec.storage_options()
    settings = {name: value for name, value in spec.content().items() if name not in NOT_SCORED}
    settings["model"] = model
    sae_files = [CONFIG_FILE, WEIGHTS_FILE, *([STATS_FILE] if spec.weighting == "idf" else []),
                 *([SAMPLE_FILE] if spec.scorer in LEARNED else [])]  # fmt: skip
    return {
        "settings": json.loads(json.dumps(settings, default=str)),
        "seeds_sha256": _digest(spec.seeds, options),
        "sae_sha256": {name: _digest(storage.join(spec.sae, name), options) for name in sae_files},
    }


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _identity_changes(bound: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between the identity an output root holds and this spec's, in words."""
    if "settings" not in bound:
        return (
            "its spec.json was written by an earlier FineScope, whose identity left out pooling, weighting, "
            "dtype and latent_stats.json"
        )
    names = [name for name in sorted({*bound["settings"], *identity["settings"]})
             if bound["settings"].get(name) != identity["settings"].get(name)]  # fmt: skip
    names += ["seeds"] if bound.get("seeds_sha256") != identity["seeds_sha256"] else []
    names += [f"sae {name}" for name in sorted({*bound.get("sae_sha256", {}), *identity["sae_sha256"]})
              if bound.get("sae_sha256", {}).get(name) != identity["sae_sha256"].get(name)]  # fmt: skip
    return f"changed: {', '.join(names)}"


def bind_output(spec: ScheduleSpec, identity: dict[str, Any], options: StorageOptions) -> str:
    """Write `spec.json` once; refuse an output root that already belongs to a different spec."""
    digest = identity_hash(identity)
    uri = storage.join(spec.out, "spec.json")
    body = json.dumps({"id": digest, "name": spec.name, "identity": identity}, indent=2, sort_keys=True)
    for _ in range(5):
        if storage.write_bytes_exclusive(uri, body.encode(), options):
            return digest
        try:
            existing = storage.read_json(uri, options)
        except FileNotFoundError:
            continue  # lost a contested create whose winner then failed: nobody wrote it, try again
        if existing.get("id") != digest:
            changes = _identity_changes(existing.get("identity", {}), identity)
            raise ConfigError(
                "out",
                spec.out,
                f"holds spec {existing.get('id')}, this spec is {digest} ({changes}): its scores would not "
                "compare with the ones there, so give it a new output root",
            )
        return digest
    raise OSError(f"could not create or read {uri}: every exclusive create of it was contested")


DTYPE_FILE = "dtype.json"
"""The encode precision the root's scores were made in: what the first batch's `dtype` became."""


def bind_dtype(out: str, decision: dict[str, Any], options: StorageOptions) -> None:
    """Record the encode dtype and device a batch decided (core.placement.dtype_decision) the first time;
    refuse a later batch that decided another, whose scores would sit on a different scale (`dtype: auto`
    becomes bfloat16 on a CPU with fast bf16 and float32 elsewhere)."""
    uri = storage.join(out, DTYPE_FILE)
    chosen = {"dtype": decision["dtype"], "device": decision["device"]}
    if storage.write_bytes_exclusive(uri, json.dumps({**chosen, "decided": decision}).encode(), options):
        return
    bound = storage.read_json(uri, options)
    if {"dtype": bound.get("dtype"), "device": bound.get("device")} != chosen:
        raise ConfigError(
            "dtype", decision["asked"], f"this root's scores were encoded in {bound.get('dtype')} on "
            f"{bound.get('device')}, and this batch's {decision['asked']} became {chosen['dtype']} on "
            f"{chosen['device']}: set dtype: {bound.get('dtype')} in the spec to go on with this root, or use a "
            "new out for the new precision",
        )  # fmt: skip
