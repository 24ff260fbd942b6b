"""Placement's parts: the device and dtype a worker resolves, the load log, and the GPU settings of the
shipped GPU pipeline. The pipeline itself runs with those settings on a two-node cluster in
tests/pipeline/test_pipeline_job.py, which asserts where every model was loaded.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import gpu_settings

from core.placement import (
    ACCELERATOR,
    FORCE_CPU,
    LOAD_LOG,
    record_model_load,
    requested_device,
    resolve_device,
    shape_free_attention,
)


def test_every_model_stage_of_the_gpu_pipeline_asks_for_a_gpu():
    settings = gpu_settings()
    assert settings["sae"] == {"gpus": 1, "trainer_gpus": 1}
    assert settings["curate"] == {"gpus": 1}
    assert settings["prune"] == {"gpus": 1}
    assert settings["finetune"] == {"zero_stage": 3, "gpus": 1}
    assert settings["evaluate"] == {"gpus": 1}


def test_a_worker_given_a_gpu_uses_cuda_or_says_how_to_run_on_cpu(monkeypatch):
    import torch

    monkeypatch.delenv(FORCE_CPU, raising=False)
    assert requested_device(0) == "cpu" and requested_device(0.5) == ACCELERATOR
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=FORCE_CPU):
            resolve_device(ACCELERATOR)
    monkeypatch.setenv(FORCE_CPU, "1")
    assert resolve_device(ACCELERATOR) == "cpu"


def test_a_load_outside_ray_is_recorded_as_the_drivers(tmp_path, monkeypatch):
    log = tmp_path / "loads.jsonl"
    monkeypatch.setenv(LOAD_LOG, str(log))
    record_model_load("some-model", "cpu")
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    # The test session's driver may have joined the session's local Ray: then the row names its node.
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    assert row == {
        "pid": os.getpid(), "node": node, "driver": True, "task": None, "what": "some-model", "device": "cpu"
    }  # fmt: skip


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively_and_faster(tmp_path, monkeypatch):
    from core import placement

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert placement.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert placement.cpu_flags(str(tmp_path / "missing")) == set()
    measured = []

    def speedup(value: float):
        return lambda: measured.append(value) or value

    # A bf16 flag says the instructions exist; the measured speed decides. Without a flag nothing is measured.
    for flags, ratio, expected in (
        ({"avx512f", "avx512_bf16"}, 2.9, "bfloat16"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, 6.0, "bfloat16"),
        ({"asimd", "bf16"}, 1.6, "bfloat16"),
        ({"avx512f", "avx512_bf16", "avx512_fp16"}, 0.54, "float32"),  # AMX hidden: slower than fp32
        ({"avx2", "avx512f"}, None, "float32"),
        (set(), None, "float32"),
    ):
        measured.clear()
        monkeypatch.setattr(placement, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(placement, "bf16_matmul_speedup", speedup(ratio))
        assert placement.resolve_dtype("auto", "cpu") == expected
        assert measured == ([ratio] if ratio is not None else [])
        assert placement.resolve_dtype("float32", "cpu") == "float32"
        assert placement.resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_the_bf16_speed_is_measured_once_per_process():
    from core import placement

    placement.bf16_matmul_speedup.cache_clear()
    first = placement.bf16_matmul_speedup((64, 64, 64), 2)
    assert first > 0 and placement.bf16_matmul_speedup((64, 64, 64), 2) == first
    assert placement.bf16_matmul_speedup.cache_info().hits == 1


def test_models_on_cuda_take_cudnn_out_of_attention_and_cpu_models_change_nothing(tiny_model_dir, monkeypatch):
    """cuDNN's attention plans every new shape anew (3.5x slower encode on an H200, docs/results.md, "GPU
    checks"); shape_free_attention turns it off for CUDA, and every model load passes its device through."""
    import torch

    from core import models

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        shape_free_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        shape_free_attention(torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    seen = []
    monkeypatch.setattr(models, "shape_free_attention", seen.append)
    models.load_model(tiny_model_dir, device="cpu")
    assert seen == ["cpu"]


def test_the_dtype_decision_records_what_auto_became_and_why(monkeypatch):
    """Two CPUs resolve `auto` differently and select different documents: the record says which ran."""
    from core import placement

    monkeypatch.setattr(placement, "cpu_flags", lambda: {"amx_bf16", "avx2"})
    monkeypatch.setattr(placement, "bf16_matmul_speedup", lambda: 5.912)
    fast = placement.dtype_decision("auto", "cpu")
    assert fast == {"asked": "auto", "device": "cpu", "dtype": "bfloat16", "cpu_bf16_flags": ["amx_bf16"],
                    "bf16_matmul_speedup": 5.912, "bf16_min_speedup": placement.BF16_MIN_SPEEDUP}  # fmt: skip
    assert placement.describe_dtype(fast).startswith("bfloat16 on cpu (auto: bf16 matmuls measured 5.912x")
    monkeypatch.setattr(placement, "bf16_matmul_speedup", lambda: 0.54)
    assert placement.dtype_decision("auto", "cpu")["dtype"] == "float32"
    monkeypatch.setattr(placement, "cpu_flags", lambda: {"avx2"})
    plain = placement.dtype_decision("auto", "cpu")
    assert plain["dtype"] == "float32" and plain["cpu_bf16_flags"] == [] and "bf16_matmul_speedup" not in plain
    assert placement.describe_dtype(plain) == "float32 on cpu (auto: no native bf16 on this CPU)"
    assert placement.dtype_decision("float32", "cpu") == {"asked": "float32", "device": "cpu", "dtype": "float32"}
    assert placement.decide_dtype("bfloat16", ACCELERATOR, 1, num_cpus=1, num_gpus=1)["device"] == "cuda"
