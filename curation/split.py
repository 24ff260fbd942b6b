"""The split stage: one domain's curated rows cut into train and held-out, and a random control drawn.

Rows go to the held-out side by a hash of their id, so a row never changes side as the corpus grows. The
random control has as many corpus documents as the train split, none of them curated for the domain:
fine-tuned on the same budget, it shows what the curation itself is worth.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from core import manifest, storage
from core.errors import ConfigError, check_range, check_seed
from core.runtime import RunConfig
from core.stage import FilesPlan, Outcome, Stage, run_stage


@dataclass
class SplitConfig(RunConfig):
    """Cut one domain's curated rows into train and held-out, and draw the random control."""

    curated: str = ""
    """The curate stage's output directory (its `curated/` and `scored/` are read)."""
    domain: str = ""
    """The domain (of the seeds file) whose curated rows are split."""
    out: str = ""
    """Output directory, local or s3://: train/, heldout/, random/, manifest.json."""
    heldout_fraction: float = 0.2
    """Share of the domain's curated rows held out of training (by a hash of each row's id)."""
    control: bool = True
    """Draw the random control: as many uncurated corpus documents as the train side holds."""
    seed: int = 0
    """Seed of the random control's draw."""

    def __post_init__(self) -> None:
        for name in ("curated", "domain", "out"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: pass --{name}")
        check_range("heldout_fraction", self.heldout_fraction, gt=0.0, lt=1.0)
        check_seed("seed", self.seed)


def heldout_mask(ids: list[str], fraction: float) -> np.ndarray:
    """True for the rows held out: a row's fate depends on its id alone, so it never changes side."""
    buckets = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2**64 for i in ids]
    return np.asarray(buckets) < fraction


def plan(config: SplitConfig) -> FilesPlan:
    options = config.storage_options()
    manifest.check_selection(config.curated, field="curated", options=options)
    parts = [_curated_dir(config), *([_scored_dir(config)] if config.control else [])]
    inputs = storage.expand(parts, options, config_field="curated")
    return FilesPlan(inputs, config.digest(inputs))


def _curated_dir(config: SplitConfig) -> str:
    return storage.join(config.curated, "curated")


def _scored_dir(config: SplitConfig) -> str:
    return storage.join(config.curated, "scored")


def distinct_ids(table: pa.Table) -> pa.Table:
    """`table` sorted by id with each id once: a text that several shards hold is one document."""
    table = table.sort_by("id")
    ids = table.column("id").to_pylist()
    first = [index == 0 or ids[index - 1] != value for index, value in enumerate(ids)]
    return table.filter(pa.array(first, pa.bool_()))


def _domain_rows(config: SplitConfig, options: storage.StorageOptions) -> pa.Table:
    """The domain's curated rows, each document once, in id order."""
    curated = storage.read_parquet(_curated_dir(config), options)
    keep = [c for c in ("id", "text", "domain", "score", "source", "meta") if c in curated.column_names]
    rows = distinct_ids(curated.select(keep).filter(pa.compute.equal(curated.column("domain"), config.domain)))
    if rows.num_rows < 2:
        found = sorted(set(curated.column("domain").to_pylist()))
        raise ConfigError(
            "domain", config.domain, f"has {rows.num_rows} curated rows (domains curated: {found}); "
            "it needs seeds in the seeds file and at least 2 curated rows (raise curate.top_n)"
        )  # fmt: skip
    return rows


def _random_control(config: SplitConfig, taken: set[str], size: int, options: storage.StorageOptions) -> pa.Table:
    """`size` distinct corpus documents, none of them curated for the domain, drawn with the config's seed."""
    scored = storage.read_parquet(_scored_dir(config), options, columns=["id", "text", "source"])
    pool = scored.filter(pa.array([i not in taken for i in scored.column("id").to_pylist()], pa.bool_()))
    pool = distinct_ids(pool)  # in id order: the draw must not depend on the order Ray wrote the files in
    if pool.num_rows < size:
        raise ConfigError(
            "control", "random", f"the corpus has {pool.num_rows} uncurated documents for "
            f"{size} control rows; use a larger corpus or `control: none`"
        )  # fmt: skip
    draw = np.random.default_rng(config.seed).choice(pool.num_rows, size=size, replace=False)
    random_rows = pool.take(pa.array(np.sort(draw)))
    return random_rows.append_column("domain", pa.array(["random"] * random_rows.num_rows))


def _split(config: SplitConfig, checked: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    rows = _domain_rows(config, options)
    mask = heldout_mask(rows.column("id").to_pylist(), config.heldout_fraction)
    if mask.all() or not mask.any():  # tiny sets: keep one row on each side
        mask = np.zeros(rows.num_rows, dtype=bool)
        mask[-1] = True
    train, heldout = rows.filter(pa.array(~mask)), rows.filter(pa.array(mask))
    storage.write_parquet_atomic(train, storage.join(config.out, "train", "part-00000.parquet"), options)
    storage.write_parquet_atomic(heldout, storage.join(config.out, "heldout", "part-00000.parquet"), options)
    counts: dict[str, Any] = {"train": train.num_rows, "heldout": heldout.num_rows}
    if config.control:
        random_rows = _random_control(config, set(rows.column("id").to_pylist()), train.num_rows, options)
        storage.write_parquet_atomic(random_rows, storage.join(config.out, "random", "part-00000.parquet"), options)
        counts["random"] = random_rows.num_rows
    return Outcome(counts)


SPLIT: Stage[SplitConfig, FilesPlan] = Stage(
    "split", plan, _split, reads=lambda config: [config.curated], uses_ray=False
)


def run_split(config: SplitConfig) -> dict[str, Any]:
    """Split one domain's curated rows and draw the control; returns the manifest (core.stage.run_stage)."""
    return run_stage(SPLIT, config)
