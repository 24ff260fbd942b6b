"""Structured pruning of every supported family (tiny models built from their config classes): ratio, exact
slicing, Taylor scores; and, on the tiny GQA Llama, reloading, errors and the job."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from core.errors import ConfigError
from tests.conftest import REPO, TINY_TEXTS
from tests.training.pruning_models import FAMILIES, build_family_model, masked, save_family_model
from training.pruning.importance import (
    Importance,
    magnitude_importance,
    random_importance,
    removal_losses,
    taylor_importance,
)
from training.pruning.prune import PruneConfig, allocate, domain_batches, read_report, run_pruning
from training.pruning.prune import plan as prune_plan
from training.pruning.structures import count_params, is_uniform, layout_of, slice_layer, slice_structures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(directory: str):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _tokenizer(directory: str):
    from core.models import load_tokenizer

    return load_tokenizer(directory)


def _input_ids(tokenizer) -> torch.Tensor:
    text = " ".join(TINY_TEXTS[:2]) + " w1 w2 w3 w4 w5 w6 w7"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _family_model(family: str, **extra):
    # The word-level test tokenizer (conftest.py) has fewer words and numbers its specials <unk>, <pad>, <s>, </s>.
    return build_family_model(family, 320, 1, 2, 3, **extra)


def _family_ids() -> torch.Tensor:
    """Two sequences of 12 tokens: longer than the sliding windows (4), so windowed layers see fewer keys."""
    return torch.randint(4, 230, (2, 12), generator=torch.Generator().manual_seed(1))


def _write_texts(path: Path, texts: list[str]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), path / "part-0.parquet")
    return str(path)


@pytest.fixture
def domain_dir(tmp_path) -> str:
    texts = [f"{text} w{i} w{i + 1} w{2 * i}" for i, text in enumerate(TINY_TEXTS * 4)]
    return _write_texts(tmp_path / "curated", texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_allocation_hits_the_ratio_within_one_rounding_step(family):
    model = _family_model(family)
    layout = layout_of(model.config)
    assert layout.full_params() == count_params(model)  # the description counts every parameter
    importance = magnitude_importance(model, layout)
    for ratio in (0.1, 0.2, 0.3, 0.4):
        plan = allocate(importance, layout, ratio, channel_multiple=8)
        # One rounding step: 8 MLP channels in every layer.
        step = 8 * layout.channel_params * layout.num_layers / plan.params_before
        assert abs(plan.ratio - ratio) <= step / 2 + 1e-9, (ratio, plan.ratio)
        assert all(len(c) % 8 == 0 for c in plan.keep_channels)
        assert is_uniform(plan.keep_groups, plan.keep_channels)
        # The decoder loses a larger share than the whole model: embeddings are never cut.
        assert plan.decoder_ratio > plan.ratio
        pruned = slice_structures(_family_model(family), plan.keep_groups, plan.keep_channels)
        assert count_params(pruned) == plan.params_after


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_logits_equal_the_unpruned_model_with_removed_heads_and_channels_zeroed(family):
    model = _family_model(family)
    layout = layout_of(model.config)
    # Random scores, one KV group of two kept per layer: which group survives differs from layer to layer,
    # so a slip in the q/k/v rows (or their biases, or a fused block's offset), the o columns or the GQA
    # pairing changes the logits.
    plan = allocate(random_importance(layout, seed=3), layout, 0.3, channel_multiple=8, keep_groups=1)
    assert len({groups[0] for groups in plan.keep_groups}) == 2
    ids = _family_ids()
    with torch.no_grad():
        original = model(ids).logits
        with masked(model, plan.keep_groups, plan.keep_channels):
            reference = model(ids).logits
        pruned = slice_structures(_family_model(family), plan.keep_groups, plan.keep_channels)
        logits = pruned(ids).logits
    assert not torch.allclose(reference, original, atol=1e-2)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    channels = len(plan.keep_channels[0])
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads) == (1, 2)
    assert (pruned.config.head_dim, pruned.config.intermediate_size) == (layout.head_dim, channels)
    assert count_params(pruned) == plan.params_after
    assert model.config.num_key_value_heads == 2  # the original's config is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_first_and_last_layers_can_stay_whole_in_memory(family):
    model = _family_model(family)
    layout = layout_of(model.config)
    plan = allocate(random_importance(layout, seed=3), layout, 0.15, channel_multiple=8, keep_first_last=True)
    sizes = [(len(g), len(c)) for g, c in zip(plan.keep_groups, plan.keep_channels, strict=True)]
    assert sizes[0] == sizes[-1] == (layout.num_kv_heads, layout.intermediate_size) != sizes[1]
    ids = _family_ids()
    with torch.no_grad():
        with masked(model, plan.keep_groups, plan.keep_channels):
            reference = model(ids).logits
        # Phi-3 splits qkv_proj's output by the config's head count: each layer runs on a config of its sizes.
        pruned = slice_structures(_family_model(family), plan.keep_groups, plan.keep_channels)
        torch.testing.assert_close(pruned(ids).logits, reference, atol=1e-4, rtol=0)


def _cut_elements(layer: nn.Module, layout, keep_groups: list[int], keep_channels: list[int]) -> dict:
    """Per parameter that slicing to these structures cuts, a mask of the elements it keeps: each element
    is tagged with its own index before a copy of the layer is sliced."""
    tagged, shapes = copy.deepcopy(layer), {name: p.shape for name, p in layer.named_parameters()}
    with torch.no_grad():
        for parameter in tagged.parameters():
            parameter.copy_(torch.arange(parameter.numel(), dtype=torch.float32).view_as(parameter))
    slice_layer(tagged, layout, keep_groups, keep_channels)
    masks = {}
    for name, parameter in tagged.named_parameters():
        if parameter.shape != shapes[name]:
            mask = torch.zeros(shapes[name].numel(), dtype=torch.bool)
            mask[parameter.detach().flatten().long()] = True
            masks[name] = mask.view(shapes[name])
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_scores_sum_what_slicing_removes_with_each_structure(family, tiny_model_dir):
    """Gradients folded and freed during backward give, per structure, the |w * grad| of an ordinary backward
    summed over exactly the weights and biases that slicing removes with that structure."""
    model = _family_model(family)
    layout = layout_of(model.config)
    batches = list(domain_batches(TINY_TEXTS, _tokenizer(tiny_model_dir), max_tokens=32, batch_size=2))
    scores = taylor_importance(model, layout, batches)
    assert scores.batches == len(batches) and all(p.grad is None for p in model.parameters())

    layers = model.get_decoder().layers
    plain = [{name: torch.zeros_like(p) for name, p in layer.named_parameters()} for layer in layers]
    for ids, mask in batches:
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        for layer, sums in zip(layers, plain, strict=True):
            for name, parameter in layer.named_parameters():
                sums[name] += (parameter * parameter.grad).abs().detach()
    every_group, every_channel = list(range(layout.num_kv_heads)), list(range(layout.intermediate_size))
    for index, (layer, sums) in enumerate(zip(layers, plain, strict=True)):
        for group in every_group:
            masks = _cut_elements(layer, layout, [g for g in every_group if g != group], every_channel)
            expected = sum(float(sums[name][~kept].sum()) for name, kept in masks.items())
            assert scores.groups[index, group].item() == pytest.approx(expected, rel=1e-4)
        for channel in (0, 37, layout.intermediate_size - 1):
            masks = _cut_elements(layer, layout, every_group, [c for c in every_channel if c != channel])
            expected = sum(float(sums[name][~kept].sum()) for name, kept in masks.items())
            assert scores.channels[index, channel].item() == pytest.approx(expected, rel=1e-4)


def _mean_loss(model: nn.Module, batches: list) -> float:
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches:
            labels = ids.masked_fill(mask == 0, -100)
            scored = int((labels[:, 1:] != -100).sum())
            nll += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * scored
            tokens += scored
    return nll / tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_loss_is_what_cutting_the_group_alone_costs(family, tiny_model_dir):
    model = _family_model(family).eval()
    layout = layout_of(model.config)
    batches = list(domain_batches(TINY_TEXTS, _tokenizer(tiny_model_dir), max_tokens=32, batch_size=2))
    losses = removal_losses(model, layout, batches)
    assert losses.shape == (layout.num_layers, layout.num_kv_heads)
    whole = _mean_loss(model, batches)
    every_group, every_channel = list(range(layout.num_kv_heads)), list(range(layout.intermediate_size))
    for layer in range(layout.num_layers):
        for group in every_group:
            keep_groups = [[g for g in every_group if g != group or i != layer] for i in range(layout.num_layers)]
            with masked(model, keep_groups, [every_channel] * layout.num_layers):
                cut = _mean_loss(model, batches)
            assert losses[layer, group].item() == pytest.approx(cut - whole, abs=1e-5)
    assert losses.abs().max() > 1e-4  # removing a group changes the loss: the hook did silence something
    assert _mean_loss(model, batches) == pytest.approx(whole, abs=1e-7)  # and let go of the model afterwards


def test_the_groups_a_layer_loses_are_the_cheapest_to_remove_not_the_lowest_scored():
    model = _family_model("llama")
    layout = layout_of(model.config)
    importance = magnitude_importance(model, layout)
    importance.groups = torch.tensor([[1.0, 9.0]] * layout.num_layers, dtype=torch.float64)  # group 0 scores lowest
    plain = allocate(importance, layout, 0.3, channel_multiple=8, keep_groups=1)
    assert plain.keep_groups == [[1]] * layout.num_layers
    # Removing group 0 alone costs more than removing group 1, in every layer but the last.
    importance.removal = torch.tensor([[2.0, 0.1]] * (layout.num_layers - 1) + [[0.1, 2.0]], dtype=torch.float64)
    measured = allocate(importance, layout, 0.3, channel_multiple=8, keep_groups=1)
    assert measured.keep_groups == [[0]] * (layout.num_layers - 1) + [[1]]
    assert measured.keep_channels == plain.keep_channels and measured.params_after == plain.params_after


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
    texts = pq.read_table(domain_dir).column("text").to_pylist()
    first = domain_batches(texts[:8], _tokenizer(tiny_model_dir), 32, 8)  # removal_docs 8, max_tokens 32 < 64
    importance.removal = removal_losses(reference, layout, first)
    saved = Importance.from_npz((Path(out) / "prune_importance.npz").read_bytes())
    torch.testing.assert_close(saved.groups, importance.groups)
    torch.testing.assert_close(saved.channels, importance.channels)
    torch.testing.assert_close(saved.removal, importance.removal)
    assert report["group_removal_loss"] == [[round(float(v), 6) for v in row] for row in importance.removal]
    plan = allocate(importance, layout, 0.3, channel_multiple=8)
    assert plan.keep_groups == keep_groups
    ids = _input_ids(_tokenizer(out))
    with torch.no_grad(), masked(reference, plan.keep_groups, plan.keep_channels):
        torch.testing.assert_close(reloaded.eval()(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_job_writes_a_standard_checkpoint_of_every_family(family, tiny_model_dir, domain_dir, tmp_path):
    """`python -m jobs.prune` (in this process, the stage's work in its Ray task) on a tiny checkpoint of
    each family: a same-family checkpoint that plain transformers loads, whose config describes the sliced
    sizes, and whose logits are the original's with the reported structures zeroed."""
    from jobs import prune as prune_job

    model_dir = save_family_model(family, _tokenizer(tiny_model_dir), tmp_path / family)
    out = tmp_path / "pruned"
    args = ["--model", model_dir, "--data", domain_dir, "--out", str(out), "--ratio", "0.3"]
    prune_job.main([*args, "--channel-multiple", "8", "--max-tokens", "32"])

    report = read_report(str(out))
    original = _load(model_dir)
    layout = layout_of(original.config)
    step = 8 * layout.channel_params * layout.num_layers / report["params_before"]
    assert report["model_type"] == family and abs(report["ratio_achieved"] - 0.3) <= step / 2 + 1e-9
    assert report["params_before"] == count_params(original)
    assert report["method"] == "taylor" and report["importance"]["batches"] == 3
    config_json = json.loads((out / "config.json").read_text())
    sizes = report["sizes_after"]
    assert config_json["model_type"] == family
    assert {key: config_json[key] for key in sizes} == sizes
    assert sizes["head_dim"] == layout.head_dim and sizes["intermediate_size"] < layout.intermediate_size

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no custom code
    assert type(reloaded) is type(original)
    assert count_params(reloaded) == report["params_after"]
    plan = allocate(Importance.from_npz((out / "prune_importance.npz").read_bytes()), layout, 0.3, channel_multiple=8)
    removed = [sorted(set(range(layout.num_kv_heads)) - set(groups)) for groups in plan.keep_groups]
    assert removed == [layer["kv_groups_removed"] for layer in report["removed_per_layer"]]
    ids = _family_ids()
    with torch.no_grad(), masked(original, plan.keep_groups, plan.keep_channels):
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, atol=1e-4, rtol=0)


def _moe_config():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_experts=4)


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _gemma3_multimodal_config():
    from transformers import Gemma3Config

    return Gemma3Config()


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)


@pytest.mark.parametrize(
    "make_config, reason",
    [
        (_moe_config, "mixture-of-experts"),
        (_mixtral_config, "mixture-of-experts"),
        (_gemma3_multimodal_config, "multimodal"),
        (_gpt2_config, "supported model types: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"),
    ],
)
def test_a_family_pruning_cannot_slice_is_refused_at_validation(make_config, reason, tmp_path):
    """From config.json alone (there are no weights to load), before Ray starts, with the reason."""
    model_dir = tmp_path / "model"
    make_config().save_pretrained(model_dir)
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as error:
        prune_plan(PruneConfig(model=str(model_dir), method="magnitude", out=str(out)))
    assert error.value.field == "model" and reason in str(error.value), str(error.value)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] in str(error.value)
    assert not out.exists()


def test_phi3_with_longrope_factors_keeps_its_attention_and_cuts_its_mlp(tmp_path):
    """Phi-3's config checks longrope factors against hidden_size / num_attention_heads, so fewer heads would
    not load: such a model keeps every attention group, and asking for fewer is refused at validation."""
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8, "rope_theta": 10000.0}
    extra = dict(rope_parameters=rope, original_max_position_embeddings=64)
    model = _family_model("phi3", **extra)
    model_dir = tmp_path / "phi3"
    model.config.save_pretrained(model_dir)
    layout = layout_of(model.config)
    assert "longrope" in layout.fixed_groups

    plan = allocate(magnitude_importance(model, layout), layout, 0.2, channel_multiple=8)
    assert plan.keep_groups == [[0, 1]] * layout.num_layers and len(plan.keep_channels[0]) < layout.intermediate_size
    slice_structures(model, plan.keep_groups, plan.keep_channels).save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert count_params(reloaded) == plan.params_after
    assert reloaded.config.rope_parameters["short_factor"] == [1.0] * 8

    with pytest.raises(ConfigError) as error:
        prune_plan(PruneConfig(model=str(model_dir), method="magnitude", keep_groups=1, out=str(tmp_path / "o")))
    assert error.value.field == "keep_groups" and "longrope" in str(error.value)
    with pytest.raises(ConfigError) as error:  # the MLP alone cannot remove 80%
        prune_plan(PruneConfig(model=str(model_dir), method="magnitude", ratio=0.8, out=str(tmp_path / "o")))
    assert error.value.field == "ratio" and "not reachable" in str(error.value)
    assert not (tmp_path / "o").exists()


def test_a_negative_removal_sample_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        PruneConfig(data="d", out=str(tmp_path), removal_docs=-1)
    assert error.value.field == "removal_docs"
