"""GPU check of the vLLM teacher backend: the distill stage's vLLM path on SmolLM2, and its generated tokens/s.

Needs a CUDA GPU and the `gpu` extra (`pip install -e '.[gpu]'`, which brings vLLM through `ray[llm]`).
It runs the very processor the distill job builds (`training.distillation.teacher.build_vllm_processor`, fed by
`training.distillation.distill.prepare_rows`) on Wikipedia summaries from the demo corpus, then checks what came back:
every row decoded and non-empty or accounted for as cut off, the ids intact, and the judge's filters
applied. It prints generated tokens/s (tokens vLLM reports, over the wall time of the processor's run,
engine start-up excluded by a warm-up pass).

    python bench/gpu_teacher_check.py
    python bench/gpu_teacher_check.py --prompts 512 --max-new-tokens 128 --engine-kwargs '{"dtype": "bfloat16"}'

Exit status 0 when every check holds, 1 otherwise, 2 without a GPU or vLLM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, HF directory or .gguf file")
    parser.add_argument("--prompts", type=int, default=256, help="documents sampled from the demo corpus")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt at most")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per engine batch")
    parser.add_argument(
        "--engine-kwargs",
        default='{"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5}',
        help="vLLM engine arguments (JSON)",
    )
    return parser.parse_args()


def main() -> int:
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print("needs a CUDA GPU and vLLM (pip install -e '.[gpu]')")
        return 2
    args = parse_args()
    import ray

    from core.models import load_tokenizer, local_model_dir
    from curation.demo_corpus import load_summaries
    from training.distillation.distill import DEFAULT_LEAK_PHRASES, PREPARED_SCHEMA, PrepareSpec, judge, prepare_rows
    from training.distillation.teacher import TeacherConfig, build_vllm_processor, eos_ids

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    tokenizer = load_tokenizer(args.model)
    rows = load_summaries()
    random.Random(0).shuffle(rows)
    spec = PrepareSpec(
        args.model, "continuation", "instruction", "response", "text", 0.5, 512, 16, 2048, args.max_new_tokens, "none"
    )
    prepared = prepare_rows(
        [{"id": str(i), "text": r["text"]} for i, r in enumerate(rows[: args.prompts])], spec, tokenizer
    )
    prepared = [row for row in prepared if not row["reason"]]
    config = TeacherConfig(
        model=args.model,
        backend="vllm",
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        actors=1,
        engine_kwargs=json.loads(args.engine_kwargs),
    )
    processor = build_vllm_processor(config, local_model_dir(args.model), PREPARED_SCHEMA.names, eos_ids(tokenizer))

    processor(ray.data.from_items(prepared[: args.batch_size])).take_all()  # warm-up: engine start, CUDA graphs
    started = time.perf_counter()
    out = processor(ray.data.from_items(prepared)).take_all()
    seconds = time.perf_counter() - started

    tokens = sum(int(row["teacher_tokens"]) for row in out)
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
    print(json.dumps({"rows": len(out), "generated_tokens": tokens, "seconds": round(seconds, 2), "reasons": reasons}))
    print(f"vLLM teacher: {tokens / seconds:.0f} generated tokens/s over {len(out)} rows")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
