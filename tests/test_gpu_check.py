"""bench/gpu_check.py's core mode runs on plain torch and transformers, with Ray, DeepSpeed and vLLM absent.

On CI the candidate is the CPU in bf16 (the same code path a GPU takes, on another device); on a GPU
machine the same command with `--device cuda` is the check the docs report.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Ray, DeepSpeed and vLLM made unimportable, as on a machine that has none of them.
RUN_WITHOUT_RAY = """
import runpy, sys
for name in ("ray", "deepspeed", "vllm"):
    sys.modules[name] = None
sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def test_core_mode_checks_agreement_without_ray(tmp_path):
    out = tmp_path / "core.json"
    args = ["--device", "cpu", "--dtype", "bfloat16", "--shape", "tiny", "--docs", "48", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_RAY, *args], cwd=REPO, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "imported of Ray, DeepSpeed, vLLM: none" in done.stdout
    report = json.loads(out.read_text())
    results = {result["name"]: result for result in report["results"]}
    assert set(results) == {
        "encode", "SAE training (fp32)", "pruning importance", "teacher (greedy)", "MMLU scoring", "training step"
    }  # fmt: skip
    assert all(result["passed"] and result["tokens_per_s"] > 0 for result in results.values())
    assert results["encode"]["agreement"]["min document cosine"] >= 0.99
    assert results["encode"]["agreement"]["selection overlap"] >= 0.95
    assert results["teacher (greedy)"]["agreement"]["identical rows (fp32)"] >= 0.90
    assert results["MMLU scoring"]["agreement"]["identical predictions"] >= 0.98
    assert results["training step"]["agreement"]["largest relative loss gap"] <= 0.02


def test_a_disagreeing_candidate_fails_the_check():
    """The selection agreement is a real comparison: vectors that disagree fail it."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_cores import per_seed_top

    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    other = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    same = per_seed_top(vectors, [0, 1, 2], 10)
    assert same == per_seed_top(vectors.clone(), [0, 1, 2], 10)
    assert len(same & per_seed_top(other, [0, 1, 2], 10)) / len(same) < 0.5
