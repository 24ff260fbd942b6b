"""Two pipeline runs on one root: the second is refused while the first lives, and a dead run's lock is
taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from core.errors import ConfigError
from core.storage import StorageOptions
from pipeline.runner import LOCK, root_lock, run_steps


def test_a_second_run_on_a_held_root_is_refused_and_the_lock_is_released_after(tmp_path):
    root = str(tmp_path / "run")
    with root_lock(root, StorageOptions()):
        held = json.loads((tmp_path / "run" / LOCK).read_text())
        with pytest.raises(ConfigError) as error:
            run_steps([], root, StorageOptions())
        assert error.value.field == "root" and f"pid {held['pid']}" in str(error.value)
    assert not (tmp_path / "run" / LOCK).exists()
    assert run_steps([], root, StorageOptions())["steps"] == {}


def test_the_lock_of_a_run_that_died_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run").mkdir()
    note = {"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then"}
    (tmp_path / "run" / LOCK).write_text(json.dumps(note))
    with root_lock(str(tmp_path / "run"), StorageOptions()):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] != note["pid"]


def test_a_lock_held_from_another_host_is_left_alone(tmp_path):
    (tmp_path / "run").mkdir()
    note = {"host": "elsewhere", "pid": 1, "started_at": "then"}
    (tmp_path / "run" / LOCK).write_text(json.dumps(note))
    with pytest.raises(ConfigError) as error, root_lock(str(tmp_path / "run"), StorageOptions()):
        pass
    assert "host elsewhere" in str(error.value) and json.loads((tmp_path / "run" / LOCK).read_text()) == note
