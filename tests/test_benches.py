"""Every bench script imports: a module moved or renamed in the library breaks a bench here, not months later
on the machine where someone finally runs it."""

from __future__ import annotations

import importlib
import sys

import pytest
from conftest import REPO

BENCHES = sorted(path.stem for path in (REPO / "bench").glob("*.py"))


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = importlib.import_module(name)
    if '__name__ == "__main__"' in (REPO / "bench" / f"{name}.py").read_text():  # a script, not a helper module
        assert callable(getattr(module, "main", None)), f"bench/{name}.py runs as a script but has no main()"
    sys.modules.pop(name, None)
