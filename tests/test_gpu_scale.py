"""The measurements at the paper's scale (`bench.gpu.width`, `prune_scale`, `train_scale` and the `scale` wrapper)
on the CPU with the tiny shape: they run with Ray, DeepSpeed and vLLM absent, write their JSON, count FLOPs as
documented, run FineScope's own code, and refuse the 1B and 8B shapes without CUDA in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

# Ray, DeepSpeed and vLLM made unimportable, as on a GPU machine that has none of them.
RUN_WITHOUT_RAY = """
import runpy, sys
for name in ("ray", "deepspeed", "vllm"):
    sys.modules[name] = None
runpy.run_module("bench.gpu.scale", run_name="__main__", alter_sys=True)
"""
PEAK_TFLOPS = 2.0  # a made-up peak, so that the CPU run reports MFU and the relation can be checked

# The tiny shape (bench.gpu.scale_models): hidden 64, 4 heads of 16 over 2 KV heads, MLP 512, 4 layers, vocab 512.
BLOCK_WEIGHTS = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 512  # q, k and v, o, gate up and down
TINY_PARAMS = 512 * 64 + 4 * (BLOCK_WEIGHTS + 2 * 64) + 64  # tied embedding, blocks with their two norms, final norm


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    """`python -m bench.gpu.scale --device cpu --shape tiny`, once, with Ray, DeepSpeed and vLLM unimportable."""
    out = tmp_path_factory.mktemp("scale")
    args = ["--device", "cpu", "--shape", "tiny", "--out", str(out), "--json", str(out / "scale.json"),
            "--peak-tflops", str(PEAK_TFLOPS)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_RAY, *args], cwd=REPO, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, out


def read(out, name: str) -> dict:
    report = json.loads((out / f"{name}-tiny.json").read_text())
    assert report["name"] == f"gpu.{name}" and report["machine"]["gpu"] is None
    assert report["settings"]["shape"] == "tiny" and report["settings"]["device"] == "cpu"
    return report["results"]


def test_the_wrapper_runs_every_script_without_ray_and_sums_them_up(scale_run):
    stdout, out = scale_run
    assert "imported of Ray, DeepSpeed, vLLM: none" in stdout
    combined = json.loads((out / "scale.json").read_text())
    runs = combined["results"]["runs"]
    assert [(run["script"], run["shape"], run["exit"]) for run in runs] == [
        ("width", "tiny", 0), ("prune_scale", "tiny", 0), ("train_scale", "tiny", 0)
    ]  # fmt: skip
    for run in runs:
        assert run["summary"] in stdout and run["results"] == read(out, run["script"])


def test_width_counts_the_truncated_forward_the_sae_and_attention(scale_run):
    width = read(scale_run[1], "width")
    assert (width["layer"], width["layers_run"], width["of_layers"]) == (2, 3, 4)
    assert width["linear_flops_per_token"] == 2 * 3 * BLOCK_WEIGHTS  # blocks 0..2, no LM head
    flops = width["flops_per_token"]
    assert flops["attention"] > 0 and flops["forward"] == pytest.approx(2 * 3 * BLOCK_WEIGHTS + flops["attention"])
    assert flops["encode"] - flops["forward"] == pytest.approx(2 * 64 * 256)  # the SAE encoder: 64 -> 256 latents
    assert [(row["max_batch_tokens"], row["max_batch_rows"]) for row in width["sizes"]] == [(8192, 64), (65536, 1024)]
    assert width["tokens"] >= 600 and width["goal_mfu"] is None
    for row in width["sizes"]:
        for part, per_token in (("encode", flops["encode"]), ("forward", flops["forward"])):
            figures = row[part]
            assert figures["tokens_per_s"] == pytest.approx(width["tokens"] / figures["seconds"])
            assert figures["mfu"] == pytest.approx(figures["tokens_per_s"] * per_token / (PEAK_TFLOPS * 1e12))
            assert figures["gpu_hours_per_1e9_tokens"] == pytest.approx(1e9 / figures["tokens_per_s"] / 3600)
            assert figures["peak_gib"] is None  # GPU memory only; a CPU has none to report
        assert row["forward_share_of_encode"] == pytest.approx(row["forward"]["seconds"] / row["encode"]["seconds"])
    assert width["best"]["encode"]["tokens_per_s"] == max(row["encode"]["tokens_per_s"] for row in width["sizes"])


def test_prune_scale_reaches_the_ratio_and_slices_what_it_allocated(scale_run):
    prune = read(scale_run[1], "prune_scale")
    assert prune["params_before"] == TINY_PARAMS and prune["checkpointing"] is True
    kept = prune["kept_per_layer"]
    # A group: 2 query heads' q rows and o columns, one KV head's k and v rows. A channel: gate, up, down.
    group, channel = 2 * (2 * 16 * 64) + 2 * (16 * 64), 3 * 64
    after = 512 * 64 + 64 + 4 * (kept["groups"] * group + kept["channels"] * channel + 2 * 64)
    assert prune["params_after"] == after and kept["channels"] % 64 == 0
    assert prune["achieved_ratio"] == pytest.approx(1 - after / TINY_PARAMS)
    step = 64 * channel * 4 / TINY_PARAMS  # one MLP rounding step, over all four layers
    assert abs(prune["achieved_ratio"] - 0.30) <= step / 2
    assert prune["importance"]["batches"] == 2 and prune["importance"]["tokens"] == 2 * 4 * 32
    assert prune["importance"]["peak_gib"] is None and prune["slice"]["seconds"] >= 0


def test_train_scale_counts_six_flops_per_weight_and_attention(scale_run):
    train = read(scale_run[1], "train_scale")
    (row,) = train["sizes"]
    assert train["params"] == TINY_PARAMS and train["path"] == "torch step, no DeepSpeed"
    assert (row["micro_batch"], row["seq"], row["steps"], row["tokens"]) == (2, 32, 2, 2 * 2 * 32)
    weights = 4 * BLOCK_WEIGHTS + 512 * 64  # the LM head (the tied embedding) multiplies every token too
    attention = 3 * 4 * 64 * 4 * (32 * 33 // 2) / 32  # 3 forwards, 4 x width x layers x causal pairs, per token
    assert row["flops_per_token"] == pytest.approx(6 * weights + attention)
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    assert row["seconds"] == pytest.approx(row["steps"] * sum(row["phases_s"].values()))
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / (PEAK_TFLOPS * 1e12))
    assert all(loss == loss for loss in (row["loss_first"], row["loss_last"]))  # finite, not NaN


def test_the_large_shapes_are_llama_3_2_1b_and_llama_3_1_8b():
    """Built on the meta device (no memory): the parameter counts of the two checkpoints."""
    from bench.gpu.scale_models import build_model

    counts = {}
    for shape in ("1b", "8b"):
        model = build_model(shape, "meta", torch.bfloat16)
        counts[shape] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert counts == {"1b": 1_235_814_400, "8b": 8_030_261_248}


def test_attention_flops_count_each_tokens_causal_pairs():
    from bench.gpu.scale_models import attention_flops, llama_config

    config = llama_config("tiny")  # 4 heads of 16: width 64
    # Documents of 1 and 3 tokens: 1 + (1 + 2 + 3) = 7 query-key pairs per layer.
    assert attention_flops(config, [1, 3], layers=2) == 4 * 64 * 2 * 7
    assert attention_flops(config, [1, 3], layers=2, training=True) == 3 * 4 * 64 * 2 * 7


def test_the_built_encoder_is_the_curate_stages_encoder(tmp_path):
    """Handed a model built in memory, the bench's encoder gives the vectors `DocumentEncoder` gives from the
    same weights saved to a directory: only the loading differs."""
    from bench.gpu.cores import word_tokenizer
    from bench.gpu.scale_models import PAD_ID, build_model, random_documents
    from bench.gpu.width import BuiltEncoder
    from curation.encode import DocumentEncoder, EncoderSettings
    from curation.sae.model import SAEConfig, TopKSAE

    saved = build_model("tiny", "cpu", torch.float32, seed=3)
    saved.save_pretrained(tmp_path)
    word_tokenizer(512).save_pretrained(tmp_path)
    sae = TopKSAE(SAEConfig(d_in=64, expansion_factor=4, k=8, layer=2), seed=1)
    spec = EncoderSettings(model=str(tmp_path), sae_dir=None, layer=2, max_batch_tokens=512, max_batch_rows=4)
    docs = random_documents(512, 800, 96, seed=5)
    reference = DocumentEncoder(spec, sae=sae)
    sae.fit_normalizer(reference.activations(docs))
    built = BuiltEncoder(spec, build_model("tiny", "cpu", torch.float32, seed=3), sae, PAD_ID)
    expected, got = reference.encode(docs), built.encode(docs)
    assert expected.shape == (len(docs), 256) and torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(BuiltEncoder(spec, build_model("tiny", "cpu", torch.float32, 4), sae, PAD_ID)
                              .encode(docs), expected, atol=1e-3)  # other weights, other vectors  # fmt: skip


@pytest.mark.parametrize("script", ["width", "prune_scale", "train_scale", "scale"])
@pytest.mark.parametrize("flags", [["--shape", "1b"], ["--shape", "8b"], ["--shape", "1b", "--device", "cpu"]])
def test_the_large_shapes_without_cuda_exit_2_with_one_line(script, flags, monkeypatch, capsys):
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = importlib.import_module(f"bench.gpu.{script}")
    assert module.main(flags) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"python -m bench.gpu.{script}: --shape ")
    if script == "train_scale" and "8b" in flags:
        assert "128 GB" in out and "ZeRO-3" in out  # refused for its size on any machine
    else:
        assert "CUDA" in out and "--shape tiny --device cpu" in out


def test_train_scale_with_zero_needs_deepspeed(monkeypatch, capsys):
    from bench.gpu import train_scale

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert train_scale.main(["--shape", "tiny", "--device", "cpu", "--zero", "2"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "missing here: deepspeed" in out


def test_the_wrapper_runs_the_plan_in_order_or_one_shape():
    from bench.gpu import scale

    parser = scale.build_parser()
    assert scale.planned(parser.parse_args([])) == [
        ("width", "1b"), ("width", "8b"), ("prune_scale", "8b"), ("prune_scale", "1b"), ("train_scale", "1b")
    ]  # fmt: skip
    assert scale.planned(parser.parse_args(["--only", "prune_scale,width"])) == [
        ("width", "1b"), ("width", "8b"), ("prune_scale", "8b"), ("prune_scale", "1b")
    ]  # fmt: skip
    assert scale.planned(parser.parse_args(["--shape", "1b", "--only", "train_scale"])) == [("train_scale", "1b")]
    with pytest.raises(ValueError, match="unknown scripts"):
        scale.planned(parser.parse_args(["--only", "widht"]))
