"""Fine-tuning's configuration: the job's settings (`FinetuneConfig`) and what each Ray Train worker runs
from (`LoopConfig`), resolved once on the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from core import storage
from core.cli import TEST_ONLY
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.runtime import RunConfig
from training.finetuning.deepspeed_config import ZERO_STAGES, ZERO_STAGES_TEXT

SUMMARY_FILE = "train_summary.json"
ALL_LINEAR = "all-linear"
"""peft's word for every linear layer of the decoder (the LM head aside): q/k/v/o and the MLP's in every family,
fused ones included (Phi-3's qkv_proj and gate_up_proj)."""


@dataclass
class FinetuneConfig(RunConfig):
    # These do not change the trained weights: they stay out of the manifest hash.
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "threads",
        "cpus",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "keep_checkpoints_when_done",
        "max_failures",
        "fail_at_step",
        "checkpoints",
    }

    model: str = ""
    """The student (e.g. the pruned model from `jobs.prune`): an embedded name (smollm2-135m), a Hugging Face
    directory, a .gguf file, a Hub id (org/name or org/name@revision) or an s3:// prefix."""
    data: str = ""
    """Distilled set from `jobs.distill`: a Parquet file or directory, local or s3://."""
    out: str = ""
    """Output directory, local or s3://: model/, metrics.jsonl, checkpoints/, manifest.json."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards the optimizer state and averages the gradients once per optimizer
    step, 2 also shards the gradients but averages them after every micro-batch, 3 also shards the
    parameters. With grad_accum > 1 and a model whose gradients fit on every worker, 1 communicates least."""
    teacher: str | None = None
    """Unpruned model for knowledge distillation (same tokenizer; any form `model` takes); needed when
    kd_weight > 0."""
    kd_weight: float = 0.0
    """Weight w of the KD term: loss = (1 - w) * cross-entropy + w * KL(teacher || student). 0: no KD."""
    kd_temperature: float = 1.0
    """Softmax temperature of the KD term."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights. Adapters are merged into the weights at export."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Module names that get LoRA adapters; `all-linear` (the default) is every linear layer of the decoder,
    whatever the family calls it."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 runs all epochs."""
    micro_batch: int = 4
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    window_steps: int = 8
    """Optimizer steps per length-bucketing window (rows are sorted by length inside a window)."""
    max_tokens: int = 512
    """Longest training sequence, prompt plus response."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay, as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    seed: int = 0
    """Seed of the batch order and of LoRA's initialisation."""
    actors: int = 2
    """Ray Train workers (one per GPU on a cluster)."""
    cpus: float = 0.0
    """CPUs each worker reserves; 0: 1 on a cluster, and on a local Ray a share that leaves room for reads."""
    gpus: float = 0.0
    """GPUs each worker reserves: 0 trains on CPUs (float32, gloo), 1 on a GPU each (bf16, NCCL)."""
    threads: int = 0
    """Torch threads per worker; 0 picks from the CPUs reserved."""
    log_every: int = 10
    """Report metrics to Ray Train every this many steps. Progress lines (steps done of the total, rate, ETA,
    loss) come every $FINESCOPE_PROGRESS_S seconds (default 30)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many optimizer steps (and restart from the latest one after a failure)."""
    checkpoints: str | None = None
    """Where Ray Train keeps checkpoints (local or s3://); default OUT/checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage while the run goes."""
    keep_checkpoints_when_done: bool = False
    """Keep the run's checkpoints once it has finished. They exist to resume an interrupted run; a finished one
    is never resumed (model/ is its result), and each holds DeepSpeed's model and optimizer state, about four
    times the model's size in fp32 with Adam, so by default the run's own checkpoint directory goes once
    model/ is written (anything else under `checkpoints` stays)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the run fails."""
    fail_at_step: int = field(default=0, metadata={TEST_ONLY: True})
    """Test hook: rank 0's process exits at this step, once per output directory."""

    def __post_init__(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: pass --{name}")
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError("zero_stage", self.zero_stage, ZERO_STAGES_TEXT)
        check_range("kd_weight", self.kd_weight, ge=0.0, le=1.0, hint="a mixing weight")
        if self.kd_weight > 0 and not self.teacher:
            raise ConfigError("teacher", self.teacher, "KD needs the unpruned model: pass --teacher DIR")
        check_range("kd_temperature", self.kd_temperature, gt=0)
        check_range("lora_r", self.lora_r, ge=0, hint="0 trains all weights")
        check_range("lora_alpha", self.lora_alpha, gt=0)
        if self.lora_r and not self.lora_targets:
            raise ConfigError("lora_targets", self.lora_targets, "LoRA needs at least one module name")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """The schedule, optimiser and execution settings; NaN and infinities are refused everywhere."""
        positive = ("epochs", "micro_batch", "grad_accum", "window_steps", "actors", "log_every")
        check_ranges(self, (*positive, "checkpoint_every", "keep_checkpoints"), ge=1)
        check_range("max_tokens", self.max_tokens, ge=8)
        check_ranges(self, ("max_steps", "warmup_steps", "max_failures", "fail_at_step", "threads"), ge=0)
        check_range("lr", self.lr, gt=0)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("min_lr_ratio", self.min_lr_ratio, ge=0.0, le=1.0)
        check_range("grad_clip", self.grad_clip, ge=0, hint="0 turns clipping off")
        check_seed("seed", self.seed)
        check_range("cpus", self.cpus, ge=0, hint="0 picks one")
        if self.gpus not in (0, 1):
            raise ConfigError("gpus", self.gpus, "must be 0 (train on CPUs) or 1 (one GPU per worker; set `actors` "
                              "to the number of GPUs)")  # fmt: skip

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoints or storage.join(self.out, "checkpoints")


@dataclass(frozen=True)
class LoopConfig:
    """What every Ray Train worker runs from, resolved once on the driver: a typo fails at parse time."""

    config: FinetuneConfig
    """The job's config, with local paths absolute and `cpus` resolved."""
    model: str
    """The student's model reference, as every worker resolves it (core.models: a local path made absolute);
    each worker makes its own local copy (once per machine) and loads from that."""
    teacher: str | None
    """The KD teacher's model reference, when kd_weight > 0."""
    total_steps: int
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    storage_options: storage.StorageOptions
    torch_extensions_dir: str
    """Where DeepSpeed's compiled CPU op is cached, shared by every worker."""
