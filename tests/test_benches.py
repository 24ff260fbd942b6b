"""Every bench script imports: a module moved or renamed in the library breaks a bench here, not months later
on the machine where someone finally runs it."""

from __future__ import annotations

import dataclasses
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


def test_emulated_bf16_matches_cpu_autocast_within_one_rounding(tiny_model_dir, monkeypatch):
    """curation_throughput's `--emulate-bf16` stands in for CPU bf16 autocast on machines without native bf16:
    its layer activations must sit as close to autocast's as a bf16 rounding, far closer than fp32 is, and
    it must keep the encoder's rule that short documents run in fp32."""
    import torch

    from curation.encode import DocumentEncoder, EncoderSpec

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("curation_throughput")
    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 230, (length,), generator=rng).tolist() for length in (40, 36, 33, 48, 8, 12)]
    spec = EncoderSpec(model=tiny_model_dir, sae_dir=None, layer=2, bf16_min_tokens=20)
    hidden = {}
    for name, encoder in (("fp32", DocumentEncoder(spec)),
                          ("autocast", DocumentEncoder(dataclasses.replace(spec, dtype="bfloat16"))),
                          ("emulated", bench.EmulatedBF16Encoder(spec))):  # fmt: skip
        hidden[name] = {tuple(rows): h[m] for rows, h, m in encoder.hidden_batches(docs)}
    sys.modules.pop("curation_throughput", None)
    for rows, exact in hidden["fp32"].items():
        auto, emulated = hidden["autocast"][rows], hidden["emulated"][rows]
        if min(len(docs[row]) for row in rows) < 20:
            assert torch.equal(emulated, exact) and torch.equal(auto, exact)
            continue
        rounding = (auto - exact).abs().mean()
        assert rounding > 0
        assert (emulated - exact).abs().mean() == pytest.approx(float(rounding), rel=0.5)
        assert (emulated - auto).abs().mean() < rounding
