"""The DeepSpeed JSON, built from the typed fine-tuning config (never read from a module global)."""

from __future__ import annotations

from typing import Any

ZERO_STAGES = (1, 2, 3)
ZERO_STAGES_TEXT = "must be 1, 2 or 3"


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
) -> dict[str, Any]:
    """A DeepSpeed config for a client optimizer (torch AdamW) and DeepSpeed's warmup-cosine schedule.

    bf16 is for GPUs; on CPU training stays fp32 (DeepSpeed's CPU accelerator and gloo). The schedule is
    DeepSpeed's, so its state lives in DeepSpeed checkpoints and resumes with them.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage} {ZERO_STAGES_TEXT}")
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if zero_stage == 3:
        # Lets engine.save_16bit_model / GatheredParameters produce a whole state dict at export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # A client torch.optim.AdamW is not on DeepSpeed's list of ZeRO-tested optimizers.
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, warmup_steps + 1, 2),
                "warmup_num_steps": max(warmup_steps, 1),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config
