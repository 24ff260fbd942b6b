"""GPU check of the vLLM teacher backend: the distill stage's vLLM path on SmolLM2, and its generated tokens/s.

Needs a CUDA GPU and the `gpu` extra (`pip install -e '.[gpu]'`, which brings vLLM through `ray[llm]`).
It runs the very processor the distill job builds (`training.distillation.teacher.build_vllm_processor`, fed by
`training.distillation.distill.prepare_rows`) on Wikipedia summaries from the demo corpus, then checks what came back:
every row decoded and non-empty or accounted for as cut off, the ids intact, and the judge's filters
applied. It prints generated tokens/s (tokens vLLM reports, over the wall time of the processor's run,
engine start-up excluded by a warm-up pass).

    python -m bench.gpu.teacher_check
    python -m bench.gpu.teacher_check --prompts 512 --max-new-tokens 128 --engine-kwargs '{"dtype": "bfloat16"}'

Exit status 0 when every check holds, 1 otherwise, 2 without a GPU or vLLM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time

from bench.measure import bench_parser, settings_of, write_json

NAME = "gpu.teacher_check"


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, HF directory or .gguf file")
    parser.add_argument("--prompts", type=int, default=256, help="documents sampled from the demo corpus")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt at most")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per engine batch")
    parser.add_argument(
        "--engine-kwargs",
        default='{"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5}',
        help="vLLM engine arguments (JSON)",
    )
    return parser


def prepared_rows(args: argparse.Namespace, tokenizer) -> list[dict]:
    """Distillation rows of `--prompts` demo-corpus summaries, prepared as the distill job prepares them."""
    from curation.demo_corpus import load_summaries
    from training.distillation.distill import PrepareSettings, prepare_rows

    rows = load_summaries()
    random.Random(0).shuffle(rows)
    spec = PrepareSettings(
        args.model, "continuation", "instruction", "response", "text", 0.5, 512, 16, 2048, args.max_new_tokens, "none"
    )
    prepared = prepare_rows(
        [{"id": str(i), "text": r["text"]} for i, r in enumerate(rows[: args.prompts])], spec, tokenizer
    )
    return [row for row in prepared if not row["reason"]]


def generate(args: argparse.Namespace, tokenizer, prepared: list[dict]) -> tuple[list[dict], float]:
    """The distill job's vLLM processor over the rows: what came back, and the seconds it took after a warm-up
    pass (engine start, CUDA graphs) on one batch."""
    import ray

    from core.models import local_model_dir
    from training.distillation.distill import PREPARED_SCHEMA
    from training.distillation.teacher import TeacherConfig, build_vllm_processor, eos_ids

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    config = TeacherConfig(
        model=args.model,
        backend="vllm",
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        actors=1,
        engine_kwargs=json.loads(args.engine_kwargs),
    )
    processor = build_vllm_processor(config, local_model_dir(args.model), PREPARED_SCHEMA.names, eos_ids(tokenizer))
    processor(ray.data.from_items(prepared[: args.batch_size])).take_all()
    started = time.perf_counter()
    out = processor(ray.data.from_items(prepared)).take_all()
    return out, time.perf_counter() - started


def check_rows(out: list[dict], prepared: list[dict]) -> tuple[dict[str, int], list[str]]:
    """The judge's verdict per reason, and what is wrong with what came back (nothing, when it is right)."""
    from training.distillation.distill import DEFAULT_LEAK_PHRASES, judge

    reasons: dict[str, int] = {}
    for row in out:
        reason = judge(row["teacher"], row["finish_reason"], None, DEFAULT_LEAK_PHRASES) or "accepted"
        reasons[reason] = reasons.get(reason, 0) + 1
    failures = []
    if sorted(row["id"] for row in out) != sorted(row["id"] for row in prepared):
        failures.append("ids lost or duplicated")
    if any("<|im_" in row["teacher"] for row in out):
        failures.append("special tokens in decoded text")
    if any(not row["teacher"].strip() and row["finish_reason"] != "stop" for row in out):
        failures.append("empty text on a cut-off row")
    if reasons.get("accepted", 0) == 0:
        failures.append("no rewrite accepted")
    return reasons, failures


def main() -> int:
    import torch

    args = build_parser().parse_args()
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print("needs a CUDA GPU and vLLM (pip install -e '.[gpu]')")
        return 2
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    prepared = prepared_rows(args, tokenizer)
    out, seconds = generate(args, tokenizer, prepared)
    tokens = sum(int(row["teacher_tokens"]) for row in out)
    reasons, failures = check_rows(out, prepared)
    figures = {"rows": len(out), "generated_tokens": tokens, "seconds": round(seconds, 2), "reasons": reasons}
    print(json.dumps(figures))
    print(f"vLLM teacher: {tokens / seconds:.0f} generated tokens/s over {len(out)} rows")
    for failure in failures:
        print(f"FAILED: {failure}")
    if args.json:
        figures = {**figures, "tokens_per_s": tokens / seconds, "failures": failures}
        accepted = reasons.get("accepted", 0) / max(len(out), 1)
        write_json(args.json, NAME, settings_of(args), figures, {"accepted / rows": accepted})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
