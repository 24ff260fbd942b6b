"""Where a job's Ray runs, and how many threads its model actors get there."""

from __future__ import annotations

import os

import pytest

from core import runtime


@pytest.mark.parametrize(("argument", "env"), [(None, None), ("local", None), (None, "local"), (None, "")])
def test_local_ray_is_recognised_however_it_is_asked_for(monkeypatch, argument, env):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert runtime.is_local_ray(argument)
    # A local Ray's actors share this machine's cores, not the CPUs they reserve.
    assert runtime.default_threads(1, 1.0, argument) == (os.cpu_count() or 1)
    assert runtime.ray_address(argument) is None


@pytest.mark.parametrize(
    ("argument", "env"), [("10.0.0.1:6379", None), (None, "http://127.0.0.1:8265"), ("auto", "local")]
)
def test_a_named_cluster_is_joined_and_actors_use_the_cpus_they_reserve(monkeypatch, argument, env):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert not runtime.is_local_ray(argument)
    assert runtime.default_threads(1, 3.0, argument) == 3
    assert runtime.ray_address(argument) == (argument or env)
