"""Every bench imports as a module of the `bench` package: a module moved or renamed in the library breaks a
bench here, not months later on the machine where someone finally runs it. Every bench takes `--json PATH`
and writes one JSON shape, and the measurements they share (`bench/measure.py`) do what they say."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_TEXTS

BENCH = REPO / "bench"
MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts) for path in BENCH.rglob("*.py") if path.name != "__init__.py"
)
SCRIPTS = [name for name in MODULES if '__name__ == "__main__"' in (REPO / f"{name.replace('.', '/')}.py").read_text()]


@pytest.mark.parametrize("name", MODULES)
def test_bench_imports_as_a_module_of_the_bench_package(name):
    module = importlib.import_module(name)
    if name in SCRIPTS:  # a bench or a check, run as `python -m NAME`
        assert callable(getattr(module, "main", None)), f"{name} runs as a script but has no main()"
        parser = module.build_parser()
        assert parser.prog == f"python -m {name}" and parser.allow_abbrev is False
        assert parser.parse_args(["--json", "figures.json"]).json == "figures.json"


def test_the_gpu_checks_live_in_their_own_folder():
    assert {"bench.gpu.check", "bench.gpu.encode", "bench.gpu.teacher_check"} <= set(SCRIPTS)
    assert {"bench.gpu.cores", "bench.gpu.pipeline_checks"} <= set(MODULES)
    assert not [path.name for path in BENCH.glob("gpu_*.py")]


def test_no_bench_and_no_bench_test_edits_sys_path():
    files = [*sorted(BENCH.rglob("*.py")), REPO / "tests" / "test_benches.py", REPO / "tests" / "test_gpu_check.py"]
    edits = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            on_sys = node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"
            if on_sys or node.attr == "syspath_prepend":
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, edits


def test_shared_measurements_are_defined_once_in_measure():
    """The timer, FLOP count, MFU, peak memory and JSON output live in bench/measure.py alone; perplexity is
    the evaluation library's."""
    shared = {"timed", "best_of_rounds", "linear_params", "flops_per_token", "mfu", "peak_flops", "peak_rss_mb",
              "write_json", "perplexity", "run_rounds", "time_forward", "status_mb"}  # fmt: skip
    defined = []
    for path in sorted(BENCH.rglob("*.py")):
        if path.name == "measure.py":
            continue
        for node in ast.parse(path.read_text()).body:  # module-level functions (a method may delegate to one)
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in shared:
                defined.append(f"{path.relative_to(REPO)}: {node.name}")
    assert not defined, defined


def test_a_bench_runs_as_python_dash_m_and_says_so_in_its_usage():
    done = subprocess.run(
        [sys.executable, "-m", "bench.eval_throughput", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m bench.eval_throughput") and "--json PATH" in done.stdout


# bench/measure.py ---------------------------------------------------------------------------------------


def test_best_of_rounds_sums_each_units_fastest_round_with_the_methods_taking_turns():
    from bench.measure import best_of_rounds

    calls = []

    def unit(name: str, slow_round: int):
        def run():
            calls.append(name)
            if (calls.count(name) - 1) == slow_round:
                time.sleep(0.2)
            return name

        return run

    rounds_seen = []
    timings = best_of_rounds(
        {"a": [unit("a0", 0), unit("a1", 1)], "b": unit("b0", 0)}, rounds=2, rotate=True,
        after_round=lambda index, found: rounds_seen.append((index, len(found["a"].wall[0]))),
    )  # fmt: skip
    # Unit by unit, the order rotating every step so no method always runs first.
    assert calls == ["a0", "b0", "a1", "b0", "a0", "a1"]
    assert rounds_seen == [(0, 1), (1, 2)]
    a = timings["a"]
    assert all(seconds >= 0.2 for seconds in a.round_seconds())  # each whole round holds one slow unit
    assert a.best() < 0.1  # but each unit has one fast round
    assert a.median() == pytest.approx(sum(a.round_seconds()) / 2)
    assert a.results == ["a0", "a1"] and timings["b"].results == ["b0"]
    assert len(a.cpu[0]) == 2 and a.best("cpu") >= 0


def test_timing_on_cuda_synchronises_the_device_around_each_unit(monkeypatch):
    import torch

    from bench.measure import best_of_rounds, timed

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    best_of_rounds({"m": lambda: events.append("run")}, rounds=2, device="cuda:0")
    assert events == ["sync", "run", "sync"] * 2
    events.clear()
    assert timed(lambda: events.append("run") or 7, "cpu")[0] == 7
    assert events == ["run"]


def test_linear_params_count_the_weights_a_forward_multiplies_by(tiny_model_dir):
    from bench.measure import flops_per_token, linear_params, mfu, peak_flops
    from core.models import load_model

    model = load_model(tiny_model_dir)
    # Per block: q and o 64x64, k and v 32x64 (2 KV heads of 16), gate and up 128x64, down 64x128.
    block = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64
    vocab = model.config.vocab_size
    assert linear_params(model) == 4 * block + vocab * 64  # the LM head too, tied or not
    assert linear_params(model, layers=2) == 2 * block  # a truncated forward: no LM head
    assert flops_per_token(model) == 2 * linear_params(model)
    assert flops_per_token(model, training=True) == 6 * linear_params(model)
    assert mfu(1000.0, 2e6, 1e12) == pytest.approx(2e-3) and mfu(1000.0, 2e6, None) is None
    assert peak_flops("cpu", None) is None and peak_flops("cpu", 100.0) == 100e12


def test_every_bench_writes_one_json_shape(tmp_path):
    import numpy as np
    import torch

    from bench.measure import write_json

    out = tmp_path / "deep" / "figures.json"
    write_json(str(out), "eval_throughput", {"questions": 40}, {"rate": np.float32(2.5)}, {"batched/per choice": 4.6})
    payload = json.loads(out.read_text())
    assert list(payload) == ["name", "date", "machine", "settings", "results", "ratios"]
    assert payload["name"] == "eval_throughput" and payload["date"][:4].isdigit()
    machine = payload["machine"]
    assert set(machine) == {"cpu", "cores", "torch", "gpu"} and machine["cpu"]
    assert machine["cores"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert payload["settings"] == {"questions": 40} and payload["results"] == {"rate": 2.5}
    assert payload["ratios"] == {"batched/per choice": 4.6}


def test_peak_rss_is_the_high_water_mark_of_each_process_of_a_tree():
    """A child that touches 300 MB and frees it at once still shows the 300 MB: the kernel's high-water mark,
    not a sample that may fall after the free."""
    from bench.measure import TreeMonitor, peak_rss_mb

    script = "import time; block = b'x' * (300 * 2**20); del block; time.sleep(1.5)"
    child = subprocess.Popen([sys.executable, "-c", script])
    monitor = TreeMonitor(child.pid, interval=0.1)
    child.wait(timeout=60)
    monitor.stop()
    assert monitor.peak() >= 300
    assert 0 < monitor.peak(anon=True) <= monitor.peak()
    assert peak_rss_mb() > 0


# The benches' own pieces --------------------------------------------------------------------------------


def test_emulated_bf16_matches_cpu_autocast_within_one_rounding(tiny_model_dir):
    """curation_throughput's `--emulate-bf16` stands in for CPU bf16 autocast on machines without native bf16:
    its layer activations must sit as close to autocast's as a bf16 rounding, far closer than fp32 is, and
    it must keep the encoder's rule that short documents run in fp32."""
    import torch

    from bench.curation_throughput import EmulatedBF16Encoder
    from curation.encode import DocumentEncoder, EncoderSettings

    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 230, (length,), generator=rng).tolist() for length in (40, 36, 33, 48, 8, 12)]
    spec = EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, bf16_min_tokens=20)
    hidden = {}
    for name, encoder in (("fp32", DocumentEncoder(spec)),
                          ("autocast", DocumentEncoder(dataclasses.replace(spec, dtype="bfloat16"))),
                          ("emulated", EmulatedBF16Encoder(spec))):  # fmt: skip
        hidden[name] = {tuple(rows): h[m] for rows, h, m in encoder.hidden_batches(docs)}
    for rows, exact in hidden["fp32"].items():
        auto, emulated = hidden["autocast"][rows], hidden["emulated"][rows]
        if min(len(docs[row]) for row in rows) < 20:
            assert torch.equal(emulated, exact) and torch.equal(auto, exact)
            continue
        rounding = (auto - exact).abs().mean()
        assert rounding > 0
        assert (emulated - exact).abs().mean() == pytest.approx(float(rounding), rel=0.5)
        assert (emulated - auto).abs().mean() < rounding


def test_prune_quality_perplexity_is_exp_of_the_mean_loss_over_each_documents_first_tokens(tiny_model_dir):
    """The bench scores held-out text with the evaluation's perplexity: token-weighted, each document cut
    to `max_tokens`, its first token unscored, exactly the next-token loss the bench reported before."""
    import torch

    from bench.prune_quality import heldout_perplexity
    from core.batching import tokenize_texts
    from core.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts, max_tokens = [*TINY_TEXTS, "w1", ""], 7  # a one-token and an empty document score nothing
    total, scored = 0.0, 0
    for ids in tokenize_texts(tokenizer, texts, max_tokens):
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        scored += len(ids) - 1
    assert scored == 5 * (max_tokens - 1)
    assert heldout_perplexity(model, tokenizer, texts, max_tokens) == pytest.approx(math.exp(total / scored), rel=1e-5)


def test_prune_quality_scores_through_the_evaluations_perplexity(tiny_model_dir, monkeypatch):
    """No perplexity of the bench's own: held-out text goes through `training.evaluation.perplexity`, one
    window per document cut to `max_tokens`."""
    import bench.prune_quality as bench
    from core.models import load_model, load_tokenizer
    from training.evaluation import perplexity

    calls = []

    def spy(model, token_lists, pad_id, window, stride, *args, **kwargs):
        calls.append((max(map(len, token_lists)), window, stride))
        return perplexity.document_nll(model, token_lists, pad_id, window, stride, *args, **kwargs)

    monkeypatch.setattr(bench, "document_nll", spy, raising=False)
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    bench.heldout_perplexity(model, tokenizer, TINY_TEXTS, 7)
    assert calls == [(7, 7, 7)]
