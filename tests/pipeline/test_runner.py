"""The graph runner (pipeline.runner.run_steps) skips a step only when nothing it depends on changed: its
config, its upstream steps' outputs, and the files it reads from outside the graph (seeds, corpus, model),
which only its stage's plan knows. Toy stages, no Ray."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from core import manifest, storage
from core.runtime import RunConfig
from core.stage import FilesPlan, Outcome, Stage
from core.storage import StorageOptions
from pipeline.graph import Step
from pipeline.runner import run_steps

pytestmark = pytest.mark.timeout(120)


@dataclass
class CopyConfig(RunConfig):
    source: str = ""
    """A file, or a directory holding `text.txt` (an upstream step's output)."""
    out: str = ""
    suffix: str = ""


def _source_file(config: CopyConfig) -> str:
    return config.source if config.source.endswith(".txt") else storage.join(config.source, "text.txt")


def _plan(config: CopyConfig) -> FilesPlan:
    inputs = storage.expand(_source_file(config))
    return FilesPlan(inputs, config.digest(inputs))


def _copy(config: CopyConfig, plan: FilesPlan, timer: manifest.Timer) -> Outcome:
    text = Path(_source_file(config)).read_text() + config.suffix
    storage.write_bytes_atomic(storage.join(config.out, "text.txt"), text.encode())
    return Outcome({"chars": len(text)})


COPY = Stage("copy", _plan, _copy, reads=lambda config: [config.source], uses_ray=False)


def _graph(root: Path, seeds: Path, suffix: str = "") -> list[Step]:
    first = CopyConfig(source=str(seeds), out=str(root / "first"))
    second = CopyConfig(source=str(root / "first"), out=str(root / "second"), suffix=suffix)
    return [Step("first", "copy", first, COPY, []), Step("second", "copy", second, COPY, ["first"])]


def _statuses(root: Path, seeds: Path, suffix: str = "") -> dict[str, str]:
    state = run_steps(_graph(root, seeds, suffix), str(root), StorageOptions())
    return {name: record["status"] for name, record in state["steps"].items()}


def test_a_rerun_skips_every_step_and_a_changed_setting_reruns_its_step(tmp_path):
    root, seeds = tmp_path / "run", tmp_path / "seeds.txt"
    seeds.write_text("algebra")
    assert _statuses(root, seeds) == {"first": "ran", "second": "ran"}
    assert _statuses(root, seeds) == {"first": "skipped", "second": "skipped"}
    assert _statuses(root, seeds, suffix="!") == {"first": "skipped", "second": "ran"}
    assert (root / "second" / "text.txt").read_text() == "algebra!"


def test_an_input_file_edited_in_place_reruns_its_step_and_every_step_after_it(tmp_path):
    root, seeds = tmp_path / "run", tmp_path / "seeds.txt"
    seeds.write_text("algebra")
    _statuses(root, seeds)
    seeds.write_text("geometry and topology")  # same path, same spec: only the file's content changed
    stat = seeds.stat()
    os.utime(seeds, (stat.st_atime, stat.st_mtime + 5))  # a coarse clock still sees a new mtime
    assert _statuses(root, seeds) == {"first": "ran", "second": "ran"}
    assert (root / "second" / "text.txt").read_text() == "geometry and topology"
    state = json.loads((root / "pipeline.json").read_text())
    assert state["steps"]["first"]["stage_hash"] == manifest.read_manifest(str(root / "first"))["hash"]
