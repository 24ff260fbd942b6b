"""Structured pruning on the tiny GQA Llama: ratio, exact slicing, reloading, errors, the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from core.errors import ConfigError
from tests.conftest import REPO, TINY_TEXTS
from training.pruning.importance import Importance, magnitude_importance, random_importance, taylor_importance
from training.pruning.prune import PruneConfig, allocate, domain_batches, read_report, run_pruning
from training.pruning.structures import count_params, kv_rows, layout_of, query_rows, slice_structures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(directory: str):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _tokenizer(directory: str):
    from core.models import load_tokenizer

    return load_tokenizer(directory)


def _input_ids(tokenizer) -> torch.Tensor:
    text = " ".join(TINY_TEXTS[:2]) + " w1 w2 w3 w4 w5 w6 w7"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def zero_removed(model, keep_groups: list[list[int]], keep_channels: list[list[int]]):
    """The original model with every removed structure's weights set to zero (the pruning reference)."""
    layout = layout_of(model.config)
    for layer, groups, channels in zip(model.model.layers, keep_groups, keep_channels, strict=True):
        gone = sorted(set(range(layout.num_kv_heads)) - set(groups))
        q_rows, kv = query_rows(layout, gone), kv_rows(layout, gone)
        attention, mlp = layer.self_attn, layer.mlp
        attention.q_proj.weight[q_rows] = 0
        attention.k_proj.weight[kv] = 0
        attention.v_proj.weight[kv] = 0
        attention.o_proj.weight[:, q_rows] = 0
        dropped = sorted(set(range(layout.intermediate_size)) - set(channels))
        mlp.gate_proj.weight[dropped] = 0
        mlp.up_proj.weight[dropped] = 0
        mlp.down_proj.weight[:, dropped] = 0
    return model


def _write_texts(path: Path, texts: list[str]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), path / "part-0.parquet")
    return str(path)


@pytest.fixture
def domain_dir(tmp_path) -> str:
    texts = [f"{text} w{i} w{i + 1} w{2 * i}" for i, text in enumerate(TINY_TEXTS * 4)]
    return _write_texts(tmp_path / "curated", texts)


def test_plan_hits_the_ratio_within_one_rounding_step(tiny_model_dir):
    model = _load(tiny_model_dir)
    layout = layout_of(model.config)
    importance = magnitude_importance(model, layout)
    for ratio in (0.1, 0.2, 0.3, 0.4):
        plan = allocate(importance, layout, ratio, channel_multiple=8)
        # One rounding step: 8 MLP channels in every layer.
        step = 8 * layout.channel_params * layout.num_layers / plan.params_before
        assert abs(plan.ratio - ratio) <= step / 2 + 1e-9, (ratio, plan.ratio)
        assert all(len(c) % 8 == 0 for c in plan.keep_channels)
        assert len({len(g) for g in plan.keep_groups}) == 1 and len({len(c) for c in plan.keep_channels}) == 1
        # The decoder loses a larger share than the whole model: embeddings are never cut.
        assert plan.decoder_ratio > plan.ratio
        pruned = slice_structures(_load(tiny_model_dir), plan.keep_groups, plan.keep_channels)
        assert count_params(pruned) == plan.params_after


def test_pruned_logits_equal_original_with_removed_structures_zeroed(tiny_model_dir):
    model = _load(tiny_model_dir)
    layout = layout_of(model.config)
    # Random scores, one KV group of two kept per layer: which group survives differs from layer to layer,
    # so a slip in the q/k/v rows, the o columns or the GQA pairing changes the logits.
    plan = allocate(random_importance(layout, seed=3), layout, 0.3, channel_multiple=8, keep_groups=1)
    assert len({groups[0] for groups in plan.keep_groups}) == 2
    ids = _input_ids(_tokenizer(tiny_model_dir))
    with torch.no_grad():
        original = model(ids).logits
        reference = zero_removed(_load(tiny_model_dir), plan.keep_groups, plan.keep_channels)(ids).logits
        pruned = slice_structures(_load(tiny_model_dir), plan.keep_groups, plan.keep_channels)(ids).logits
    assert pruned.shape == original.shape
    assert not torch.allclose(reference, original, atol=1e-3)
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-5)
    assert model.config.num_key_value_heads == 2  # the original's config is untouched


def test_first_and_last_layers_can_stay_whole_in_memory(tiny_model_dir):
    model = _load(tiny_model_dir)
    layout = layout_of(model.config)
    plan = allocate(magnitude_importance(model, layout), layout, 0.2, channel_multiple=8, keep_first_last=True)
    sizes = [(len(g), len(c)) for g, c in zip(plan.keep_groups, plan.keep_channels, strict=True)]
    assert sizes[0] == sizes[-1] == (layout.num_kv_heads, layout.intermediate_size)
    assert sizes[1] == sizes[2] and sizes[1] != sizes[0]
    ids = _input_ids(_tokenizer(tiny_model_dir))
    with torch.no_grad():
        reference = zero_removed(_load(tiny_model_dir), plan.keep_groups, plan.keep_channels)(ids).logits
        pruned = slice_structures(_load(tiny_model_dir), plan.keep_groups, plan.keep_channels)(ids).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-5)


def test_taylor_hooks_match_a_plain_backward(tiny_model_dir):
    """Gradients folded and freed during backward give exactly the |w * grad| sums of an ordinary backward."""
    model = _load(tiny_model_dir)
    layout = layout_of(model.config)
    tokenizer = _tokenizer(tiny_model_dir)
    batches = list(domain_batches(TINY_TEXTS, tokenizer, max_tokens=32, batch_size=2))
    scores = taylor_importance(model, layout, batches)
    assert scores.batches == len(batches) and all(p.grad is None for p in model.parameters())

    expected = Importance(torch.zeros_like(scores.groups), torch.zeros_like(scores.channels))
    for ids, mask in batches:
        model.zero_grad()
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            for group in range(layout.num_kv_heads):
                q, kv = query_rows(layout, [group]), kv_rows(layout, [group])
                total = sum(
                    (lin.weight * lin.weight.grad)[rows].abs().sum()
                    for lin, rows in ((attention.q_proj, q), (attention.k_proj, kv), (attention.v_proj, kv))
                )
                total += (attention.o_proj.weight * attention.o_proj.weight.grad)[:, q].abs().sum()
                expected.groups[index, group] += float(total.detach())
            channel = (mlp.gate_proj.weight * mlp.gate_proj.weight.grad).abs().sum(1)
            channel += (mlp.up_proj.weight * mlp.up_proj.weight.grad).abs().sum(1)
            channel += (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0)
            expected.channels[index] += channel.double()
    torch.testing.assert_close(scores.groups, expected.groups, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.channels, expected.channels, rtol=1e-4, atol=1e-7)


@pytest.mark.timeout(300)
def test_run_pruning_writes_a_standard_checkpoint_and_skips_on_rerun(tiny_model_dir, domain_dir, tmp_path):
    out = str(tmp_path / "pruned")
    config = PruneConfig(model=tiny_model_dir, data=domain_dir, out=out, ratio=0.3, channel_multiple=8, max_tokens=32)
    run_pruning(config)
    report = read_report(out)
    files = {p.name for p in Path(out).iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "prune_report.json",
        "manifest.json",
        "prune_importance.npz",
    } <= files
    assert abs(report["ratio_achieved"] - 0.3) < 0.03 and report["decoder_ratio_achieved"] > report["ratio_achieved"]
    assert report["method"] == "taylor" and report["importance"]["batches"] == 3
    assert len(report["removed_per_layer"]) == 4

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no custom code
    assert count_params(reloaded) == report["params_after"]
    config_json = json.loads((Path(out) / "config.json").read_text())
    sizes = report["sizes_after"]
    assert config_json["intermediate_size"] == sizes["intermediate_size"] < 128
    assert config_json["num_key_value_heads"] == sizes["num_key_value_heads"]
    assert config_json["num_attention_heads"] == 2 * sizes["num_key_value_heads"]
    assert config_json["head_dim"] == 16
    # The saved model is the original with exactly the reported structures zeroed.
    keep_groups = [sorted(set(range(2)) - set(r["kv_groups_removed"])) for r in report["removed_per_layer"]]
    reference = _load(tiny_model_dir)
    layout = layout_of(reference.config)
    importance = taylor_importance(
        reference,
        layout,
        domain_batches(
            [t for t in pq.read_table(domain_dir).column("text").to_pylist()], _tokenizer(tiny_model_dir), 32, 8
        ),
    )
    saved = Importance.from_npz((Path(out) / "prune_importance.npz").read_bytes())
    torch.testing.assert_close(saved.groups, importance.groups)
    torch.testing.assert_close(saved.channels, importance.channels)
    plan = allocate(importance, layout, 0.3, channel_multiple=8)
    assert plan.keep_groups == keep_groups
    ids = _input_ids(_tokenizer(out))
    with torch.no_grad():
        expected = zero_removed(reference, plan.keep_groups, plan.keep_channels)(ids).logits
        torch.testing.assert_close(reloaded.eval()(ids).logits, expected, atol=1e-5, rtol=1e-5)

    mtime = (Path(out) / "model.safetensors").stat().st_mtime_ns
    assert run_pruning(config)["params_after"] == report["params_after"]  # the manifest carries the counts
    assert (Path(out) / "model.safetensors").stat().st_mtime_ns == mtime  # skipped: the manifest matched


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_a_ratio_outside_zero_one_is_refused(ratio, tmp_path):
    with pytest.raises(ConfigError) as error:
        PruneConfig(data="d", out=str(tmp_path), ratio=ratio)
    assert error.value.field == "ratio"


def test_empty_data_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    empty = _write_texts(tmp_path / "empty", [])
    with pytest.raises(ConfigError) as error:
        run_pruning(PruneConfig(model=tiny_model_dir, data=empty, out=str(tmp_path / "o")))
    assert error.value.field == "data" and "no non-empty text" in str(error.value)
    with pytest.raises(ConfigError) as error:
        run_pruning(PruneConfig(model=tiny_model_dir, data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    assert error.value.field == "data"
    assert not (tmp_path / "o").exists()


def test_an_unsupported_model_type_is_refused(tmp_path, domain_dir):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError) as error:
        run_pruning(PruneConfig(model=str(tmp_path / "gpt2"), data=domain_dir, out=str(tmp_path / "o")))
    assert error.value.field == "model" and "gpt2" in str(error.value)


def test_keep_first_last_is_refused_by_the_job(tiny_model_dir, domain_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_pruning(PruneConfig(model=tiny_model_dir, data=domain_dir, out=str(tmp_path / "o"), keep_first_last=True))
    assert error.value.field == "keep_first_last"


@pytest.mark.timeout(600)
def test_prune_job_subprocess(tiny_model_dir, domain_dir, tmp_path):
    out = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "jobs.prune", "--model", tiny_model_dir, "--data", domain_dir]
    command += ["--ratio", "0.25", "--out", str(out), "--method", "magnitude", "--channel-multiple", "8"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "magnitude" and abs(report["ratio_achieved"] - 0.25) < 0.03
    assert json.loads((out / "manifest.json").read_text())["stage"] == "prune"
    assert count_params(AutoModelForCausalLM.from_pretrained(out)) == report["params_after"]

    bad = subprocess.run(
        [*command[:7], "--ratio", "1.0", "--out", str(tmp_path / "bad")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode == 2 and "ratio=1.0" in bad.stderr
