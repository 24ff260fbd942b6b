"""Stage 2c: fine-tune the pruned model on the distilled set, with Ray Train and DeepSpeed (ZeRO 2 or 3).

The driver checks the config and inputs, reads the distilled Parquet as a Ray Dataset and runs a
`TorchTrainer`. Each worker builds the model from the Hugging Face directory (optionally with LoRA
adapters), wraps it with `deepspeed.initialize` using a config built from `FinetuneConfig`, streams rows
through `ray.train.get_dataset_shard`, and trains on response tokens only, optionally with a KD term
against the unpruned teacher whose logits are computed on the fly.

Exact resume. Every worker iterates the whole dataset in the same order (the dataset is not split and
Ray Data preserves order), and `training.finetuning.sft_data` turns that order into steps with a pure function:
windows of whole optimizer steps, length-sorted, cut into micro-batches, shuffled with a seed of
(seed, epoch, window); rank r takes every world-th micro-batch. A checkpoint records the epoch and the
optimizer steps done in it, next to DeepSpeed's model, optimizer and LR-schedule state. On restart (Ray
Train's FailureConfig restarts the worker group and hands back the latest checkpoint), each worker skips
the windows already consumed without tokenizing them, rebuilds the partly consumed window and skips its
first steps. No row is repeated or skipped, and the batches after resume are the ones an uninterrupted
run would have seen. Ray Data's `streaming_split` is not used because it hands blocks to workers
dynamically, so which rows a worker sees differs from run to run; reading the text W times is cheap next
to training on it.

Outputs under `out`: model/ (HF directory: weights with LoRA merged, tokenizer), metrics.jsonl,
checkpoints/ (Ray Train, unless `checkpoints` points elsewhere) and, last, manifest.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow.parquet as pq
import torch

from core import manifest, models, storage
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.placement import cpu_forced, record_model_load, shape_free_attention, worker_device
from core.progress import Progress
from core.runtime import RunConfig, is_local_ray
from core.stage import Outcome, Stage, run_stage
from training.finetuning.deepspeed_config import ZERO_STAGES, ZERO_STAGES_TEXT, build_deepspeed_config
from training.finetuning.losses import causal_lm_loss, combined_loss, kd_loss
from training.finetuning.sft_data import (
    DISTILLED_COLUMNS,
    BatchShape,
    Example,
    collate,
    encode_example,
    rank_micro_batches,
    training_target,
    window_order,
)
from training.finetuning.step_clock import PHASES, StepClock

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "train_summary.json"
DS_TAG = "ds"
DATA_READS = {"distill": "distilled"}
"""--data may name a distill output root: its distilled/ is read (never its parts/ or rejects/)."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig(RunConfig):
    # These do not change the trained weights: they stay out of the manifest hash.
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "torch_threads",
        "cpus_per_worker",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
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
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names that get LoRA adapters."""
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
    num_workers: int = 2
    """Ray Train workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Train on GPUs (bf16); otherwise CPU (fp32, gloo)."""
    cpus_per_worker: float = 0.0
    """CPUs each worker reserves; 0: 1 on a cluster, and on a local Ray a share that leaves room for reads."""
    torch_threads: int = 0
    """Torch threads per worker; 0 picks from the CPUs reserved."""
    log_every: int = 10
    """Report metrics to Ray Train every this many steps. Progress lines (steps done of the total, rate, ETA,
    loss) come every $FINESCOPE_PROGRESS_S seconds (default 30)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many optimizer steps (and restart from the latest one after a failure)."""
    checkpoints: str | None = None
    """Where Ray Train keeps checkpoints (local or s3://); default OUT/checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the run fails."""
    fail_at_step: int = 0
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
        positive = ("epochs", "micro_batch", "grad_accum", "window_steps", "num_workers", "log_every")
        check_ranges(self, (*positive, "checkpoint_every", "keep_checkpoints"), ge=1)
        check_range("max_tokens", self.max_tokens, ge=8)
        check_ranges(self, ("max_steps", "warmup_steps", "max_failures", "fail_at_step", "torch_threads"), ge=0)
        check_range("lr", self.lr, gt=0)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("min_lr_ratio", self.min_lr_ratio, ge=0.0, le=1.0)
        check_range("grad_clip", self.grad_clip, ge=0, hint="0 turns clipping off")
        check_seed("seed", self.seed)
        check_range("cpus_per_worker", self.cpus_per_worker, ge=0, hint="0 picks one")

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoints or storage.join(self.out, "checkpoints")


@dataclass(frozen=True)
class LoopConfig:
    """What every Ray Train worker runs from, resolved once on the driver: a typo fails at parse time."""

    config: FinetuneConfig
    """The job's config, with local paths absolute and `cpus_per_worker` resolved."""
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


@dataclass
class FinetunePlan:
    """What validation found: the model references, input files, row count, schedule length, hash."""

    config: FinetuneConfig
    model: str
    teacher: str | None
    inputs: list[storage.FileInfo]
    columns: list[str]
    rows: int
    total_steps: int
    digest: str


def _read_model_config(
    name: str, field_name: str, options: storage.StorageOptions
) -> tuple[models.ModelRef, dict[str, Any]]:
    """The model's reference and its config.json, read without its weights."""
    ref = models.model_ref(name, field_name)
    return ref, models.model_config(ref, options, field_name)


def plan(config: FinetuneConfig) -> FinetunePlan:
    """Check the models, the data and the schedule without Ray, in about a second."""
    options = config.storage_options()
    model, model_config = _read_model_config(config.model, "model", options)
    teacher = None
    if config.kd_weight > 0 and config.teacher:
        teacher, teacher_config = _read_model_config(config.teacher, "teacher", options)
        if teacher_config.get("vocab_size") != model_config.get("vocab_size"):
            raise ConfigError(
                "teacher",
                config.teacher,
                f"vocabulary {teacher_config.get('vocab_size')} differs from the student's "
                f"{model_config.get('vocab_size')}: KD needs the same tokenizer",
            )
    inputs = manifest.input_files(config.data, field="data", reads=DATA_READS, options=options, suffixes=(".parquet",))
    if not inputs:
        raise ConfigError("data", config.data, "holds no *.parquet file; pass the output of `jobs.distill`")
    rows, columns = 0, None
    for info in inputs:
        with storage.open_read(info.uri, options) as handle:
            metadata = pq.ParquetFile(handle)
            rows += metadata.metadata.num_rows
            columns = columns or list(metadata.schema_arrow.names)
    missing = [name for name in ("prompt",) if name not in columns]
    if "response" not in columns:
        missing += [name for name in DISTILLED_COLUMNS if name not in columns]
    if missing:
        raise ConfigError("data", config.data, f"lacks the columns {missing}; expected a distilled set")
    rows_per_step = config.micro_batch * config.grad_accum * config.num_workers
    steps_per_epoch = rows // rows_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            "micro_batch", config.micro_batch, f"{rows} rows do not fill one step of {rows_per_step} rows"
        )
    total = steps_per_epoch * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    digest = config.digest(
        [*inputs, *_model_files(model, "model", options), *_model_files(teacher, "teacher", options)]
    )
    read_columns = [name for name in ("id", "prompt", "response", *DISTILLED_COLUMNS) if name in columns]
    return FinetunePlan(
        config, model.canonical, teacher and teacher.canonical, inputs, sorted(set(read_columns)), rows, total, digest
    )


def _model_files(
    ref: models.ModelRef | None, field_name: str, options: storage.StorageOptions
) -> list[storage.FileInfo]:
    """The model's identity in the digest (core.models.model_inputs): a changed model reruns the stage."""
    return [] if ref is None else models.model_inputs(ref, options, field_name)


# ---------------------------------------------------------------- worker side


@dataclass
class TrainerState:
    """Where training stands; saved next to DeepSpeed's state in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None


def _worker_threads(loop: LoopConfig) -> int:
    """Torch threads per worker: `torch_threads`, else one per whole CPU the worker reserves (at least one).

    Two workers on two cores thus run one thread each: more would oversubscribe the cores.
    """
    if loop.config.torch_threads:
        return loop.config.torch_threads
    return max(1, int(loop.config.cpus_per_worker))


def worker_environment(loop: LoopConfig) -> dict[str, str]:
    """Environment of the Ray Train worker processes.

    OpenMP gets the worker's thread count (Ray would set one per whole CPU reserved, which disagrees with
    `torch_threads` when that is set). Ray starts worker processes at niceness 15; a training worker holds
    its CPUs for the whole fit and every step waits for the slowest worker, so it runs at normal priority:
    otherwise any other process on the node, Ray's own daemons included, preempts it and stalls them all.
    """
    return {"OMP_NUM_THREADS": str(_worker_threads(loop)), "RAY_worker_niceness": "0"}


def _worker_device(loop: LoopConfig) -> str:
    """cuda for a worker given a GPU (use_gpu), unless FINESCOPE_FORCE_CPU; it also decides bf16."""
    return worker_device(1 if loop.config.use_gpu else 0)


def _build_model(loop: LoopConfig) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = models.local_model_dir(loop.model, loop.storage_options)  # copied once per machine
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(loop.config.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    record_model_load(loop.model, _worker_device(loop))
    shape_free_attention(_worker_device(loop))
    model.config.use_cache = False
    if loop.config.lora_r:
        model = _with_lora(model, loop)
    return model, tokenizer


def _lora_config(loop: LoopConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=loop.config.lora_r,
        lora_alpha=loop.config.lora_alpha,
        lora_dropout=0.0,
        target_modules=loop.config.lora_targets,
    )


def _with_lora(model: torch.nn.Module, loop: LoopConfig) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(loop))


def _load_teacher(loop: LoopConfig, device: torch.device) -> torch.nn.Module | None:
    if not loop.teacher:
        return None
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if _worker_device(loop) == "cuda" else torch.float32
    teacher_dir = models.local_model_dir(loop.teacher, loop.storage_options, field="teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype, local_files_only=True)
    record_model_load(loop.teacher, device)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _build_engine(model: torch.nn.Module, loop: LoopConfig, world_size: int):
    import deepspeed

    ds_config = build_deepspeed_config(
        zero_stage=loop.config.zero_stage,
        micro_batch=loop.config.micro_batch,
        grad_accum=loop.config.grad_accum,
        world_size=world_size,
        grad_clip=loop.config.grad_clip,
        bf16=_worker_device(loop) == "cuda",
        total_steps=loop.total_steps,
        warmup_steps=loop.config.warmup_steps,
        min_lr_ratio=loop.config.min_lr_ratio,
    )
    trainable = [param for param in model.parameters() if param.requires_grad]
    # Fused: one pass over ZeRO's flat partition, where torch's default multi-tensor AdamW makes one per
    # elementwise operation; on a CPU worker that step was a large share of each optimizer step.
    optimizer = torch.optim.AdamW(trainable, lr=loop.config.lr, weight_decay=loop.config.weight_decay, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


class CheckpointRefused(RuntimeError):
    """A checkpoint file holds something other than what DeepSpeed saves; it was not loaded."""


def _checkpoint_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its ZeRO-2/3 checkpoints besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _check_checkpoint_files(directory: str, allowed: list[Any]) -> None:
    """Refuse any `*.pt` file that is not a torch.save archive or that pickles a global outside `allowed`.

    Reads each archive's pickle opcodes without running them, so a planted payload never executes.
    """
    names = {f"{item.__module__}.{item.__qualname__}" for item in allowed}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as error:  # not a zip archive: an old-format or hand-made pickle
                raise CheckpointRefused(f"checkpoint file {path} is not a torch.save archive ({error})") from None
            if unexpected := sorted(set(found) - names):
                raise CheckpointRefused(
                    f"checkpoint file {path} pickles {unexpected}, which no DeepSpeed checkpoint holds: refusing "
                    f"to load it; delete the checkpoint (or restore a copy you trust) and rerun"
                )


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load in here (DeepSpeed passes weights_only=False) unpickles only tensors, plain
    containers and DeepSpeed's own safe classes."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_checkpoint(engine, directory: str) -> TrainerState:
    """Load a checkpoint written by `_save_checkpoint` into `engine` and return its trainer state.

    Checkpoints may live on shared storage that others can write to, and DeepSpeed's own loader would
    unpickle anything. Every file is checked first and then loaded with weights_only unpickling; a file
    that holds anything else raises CheckpointRefused and nothing of it runs.
    """
    import pickle

    _check_checkpoint_files(directory, _checkpoint_safe_globals())
    with _weights_only_loads():
        try:
            engine.load_checkpoint(directory, tag=DS_TAG)
        except pickle.UnpicklingError as error:
            raise CheckpointRefused(f"checkpoint {directory} refused: {str(error).splitlines()[0]}") from None
    with open(os.path.join(directory, STATE_FILE)) as handle:
        return TrainerState(**json.load(handle))


def _restore(engine, loop: LoopConfig) -> TrainerState:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainerState()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(engine, directory)
    state.resumed_from_step = state.global_step
    logger.info("resumed at step %d (epoch %d, step %d of it)", state.global_step, state.epoch, state.step_in_epoch)
    return state


def _rows(shard, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    for batch in shard.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
        yield from batch.to_pylist()


def _windows(shard, shape: BatchShape) -> Iterator[list[dict[str, Any]]]:
    """The rows of one epoch in windows of shape.window_rows (the last one may be shorter)."""
    window: list[dict[str, Any]] = []
    for row in _rows(shard):
        if training_target(row) is None:
            continue  # no text to learn from; dropped the same way in every run
        window.append(row)
        if len(window) == shape.window_rows:
            yield window
            window = []
    if window:
        yield window


def _steps(shard, tokenizer, loop: LoopConfig, shape: BatchShape, state: TrainerState, rank: int):
    """Yield (epoch, step_in_epoch, this rank's micro-batches) from where `state` stands."""
    for epoch in range(state.epoch, loop.config.epochs):
        skip = state.step_in_epoch if epoch == state.epoch else 0
        for window_index, window in enumerate(_windows(shard, shape)):
            first_step = window_index * shape.window_steps
            if first_step + shape.window_steps <= skip:
                continue  # consumed before the checkpoint: not even tokenized
            examples = [
                Example(*encode_example(tokenizer, row["prompt"], training_target(row), loop.config.max_tokens))
                for row in window
            ]
            order = window_order([len(e.input_ids) for e in examples], shape, loop.config.seed, epoch, window_index)
            for offset, micro in enumerate(rank_micro_batches(order, shape, rank)):
                if first_step + offset < skip:
                    continue
                yield (
                    epoch,
                    first_step + offset,
                    [collate([examples[i] for i in ids], tokenizer.pad_token_id) for ids in micro],
                )


def _train_step(
    engine, teacher, micro_batches: list[dict[str, torch.Tensor]], loop: LoopConfig, clock: StepClock
) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns [loss, ce, kd, response tokens, tokens].

    The statistics stay tensors until the step ends: one host copy per step rather than five `.item()`
    calls per micro-batch (each a device synchronisation on a GPU).
    """
    parts = []
    for batch in micro_batches:
        with clock.phase("forward"):
            batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce, counted = causal_lm_loss(logits, batch["labels"])
            kd = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                kd = kd_loss(logits, teacher_logits, batch["labels"], loop.config.kd_temperature)
            loss = combined_loss(ce, kd, loop.config.kd_weight)
        with clock.phase("backward"):
            engine.backward(loss)
        with clock.phase("optimizer"):
            engine.step()
        kd_value = kd.detach() if kd is not None else torch.zeros_like(ce)
        values = [loss.detach(), ce.detach(), kd_value, counted, batch["attention_mask"].sum()]
        parts.append(torch.stack([value.double() for value in values]))
    return torch.stack(parts).sum(dim=0).cpu()


def _time_gradient_reduction(engine, clock: StepClock) -> None:
    """Count DeepSpeed's end-of-backward gradient reduction under `grad_reduce` instead of `backward`.

    ZeRO-2 and ZeRO-3 reduce the gradients left in their bucket in this epilogue of `engine.backward`
    after every micro-batch (with the default bucket size, all of them below a few hundred million
    parameters); ZeRO-1 calls it once per optimizer step, at the last micro-batch's backward.
    """
    optimizer = engine.optimizer
    epilogue = getattr(optimizer, "overlapping_partition_gradients_reduce_epilogue", None)
    if epilogue is not None:
        optimizer.overlapping_partition_gradients_reduce_epilogue = clock.wrap("grad_reduce", epilogue)


def _save_checkpoint(engine, state: TrainerState, metrics: dict[str, Any], rank: int) -> None:
    """Every rank saves its DeepSpeed shard; Ray Train merges the ranks' directories in storage."""
    import ray.train

    directory = tempfile.mkdtemp(prefix="finescope-ckpt-")
    try:
        engine.save_checkpoint(directory, tag=DS_TAG)
        if rank == 0:
            with open(os.path.join(directory, STATE_FILE), "w") as handle:
                json.dump(dataclasses.asdict(state), handle)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step_{state.global_step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _export(engine, tokenizer, loop: LoopConfig, rank: int) -> None:
    """Write the trained weights (LoRA merged) as a Hugging Face directory to OUT/model, from rank 0."""
    import deepspeed
    import torch.distributed as dist

    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):  # no-op below ZeRO-3
        state_dict = (
            {name: tensor.detach().float().cpu().clone() for name, tensor in engine.module.state_dict().items()}
            if rank == 0
            else None
        )
    if rank == 0:
        model = merged_model(loop, state_dict)
        staging = tempfile.mkdtemp(prefix="finescope-export-")
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            target = storage.join(loop.config.out, "model")
            storage.remove(target, loop.storage_options)
            storage.upload_dir(staging, target, loop.storage_options)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def merged_model(loop: LoopConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model holding `state_dict`; LoRA adapters are merged into the base weights."""
    from transformers import AutoModelForCausalLM

    model_dir = models.local_model_dir(loop.model, loop.storage_options)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    if loop.config.lora_r:
        model = _with_lora(model, loop)
        model.load_state_dict(state_dict, strict=True)
        return model.merge_and_unload()
    model.load_state_dict(state_dict, strict=True)
    return model


def _write_metrics(history: list[dict[str, Any]], loop: LoopConfig) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    storage.write_bytes_atomic(storage.join(loop.config.out, "metrics.jsonl"), text.encode(), loop.storage_options)


def _step_metrics(
    engine, stats: torch.Tensor, phases: dict[str, float], state: TrainerState, world_size: int, loop: LoopConfig
) -> dict:
    """The step's metrics row, from every rank's statistics and phase times (one all-gather).

    Losses and token counts are summed over ranks; `step_s` and `phases_s` are the ranks' means (each
    rank's phases sum to its step time), and `wait_s` estimates the part of `grad_reduce` spent waiting for
    a slower rank: the mean over ranks of (slowest rank's data + forward + backward) - (its own).
    """
    import torch.distributed as dist

    local = torch.cat([stats, torch.tensor([phases[name] for name in PHASES], dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)
    totals = table[:, : len(stats)].sum(dim=0)
    times = table[:, len(stats) :]
    mean_phases = {name: float(value) for name, value in zip(PHASES, times.mean(dim=0), strict=True)}
    seconds = float(times.sum(dim=1).mean())
    compute = times[:, [PHASES.index(name) for name in ("data", "forward", "backward")]].sum(dim=1)
    micro_batches = world_size * loop.config.grad_accum
    return {
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": totals[0].item() / micro_batches,
        "ce": totals[1].item() / micro_batches,
        "kd": totals[2].item() / micro_batches,
        "response_tokens": int(totals[3].item()),
        "tokens": int(totals[4].item()),
        "tokens_per_s": totals[4].item() / max(seconds, 1e-9),
        "lr": float(engine.get_lr()[0]),
        "samples": state.samples,
        "step_s": seconds,
        "phases_s": mean_phases,
        "wait_s": float((compute.max() - compute).mean()),
    }


def _step_note(epoch: int, metrics: dict[str, Any]) -> str:
    """What a fine-tuning progress line adds after its ETA."""
    return f"epoch {epoch} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tokens/s"


def _inject_failure(loop: LoopConfig) -> None:
    """Test hook: kill this worker process once per output directory, as a crash would."""
    marker = storage.join(loop.config.out, ".fail_at_step_done")
    if storage.exists(marker, loop.storage_options):
        return
    storage.write_bytes_atomic(marker, b"", loop.storage_options)
    # Ray Train registers a reported checkpoint when its controller next polls the workers; give it that
    # time, so the restart finds the checkpoint just written, as it would after a real crash.
    time.sleep(10)
    logger.warning("fail_at_step=%d: rank 0 exits to test recovery", loop.config.fail_at_step)
    os._exit(1)


def _summary(state: Any, metrics: dict[str, Any], engine: Any) -> dict[str, Any]:
    """The fit's totals, with the threads, priority and optimizer this worker ran."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside ZeRO's wrapper
    return {
        "optimizer": f"{type(optimizer).__name__}{', fused' if optimizer.defaults.get('fused') else ''}",
        "steps": state.global_step,
        "samples": state.samples,
        "tokens": state.tokens,
        "final_loss": metrics.get("loss"),
        "resumed_from_step": state.resumed_from_step,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "niceness": os.nice(0),
    }


def train_loop_per_worker(train_loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train worker function; everything it needs comes from its :class:`LoopConfig`."""
    loop = train_loop_config["loop"]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", loop.torch_extensions_dir)
    import ray.train

    torch.set_num_threads(_worker_threads(loop))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model, tokenizer = _build_model(loop)
    engine = _build_engine(model, loop, world_size)
    teacher = _load_teacher(loop, engine.device)
    state = _restore(engine, loop)
    shape = BatchShape(loop.config.micro_batch, loop.config.grad_accum, world_size, loop.config.window_steps)
    shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, Any] = {}
    progress = Progress("finetune", loop.total_steps, "steps", initial=state.global_step, enabled=rank == 0)
    clock = StepClock()
    _time_gradient_reduction(engine, clock)
    steps = _steps(shard, tokenizer, loop, shape, state, rank)
    while not (loop.config.max_steps and state.global_step >= loop.config.max_steps):
        with clock.phase("data"):
            step = next(steps, None)
        if step is None:
            break
        epoch, step_in_epoch, micro_batches = step
        stats = _train_step(engine, teacher, micro_batches, loop, clock)
        phases = clock.lap()  # this step's data and compute, and the previous step's bookkeeping
        state.global_step += 1
        state.epoch, state.step_in_epoch = epoch, step_in_epoch + 1
        state.samples += shape.rows_per_step
        with clock.phase("report"):
            metrics = _step_metrics(engine, stats, phases, state, world_size, loop)
            state.tokens += metrics["tokens"]
            state.history.append(metrics)
        if state.global_step == loop.config.fail_at_step and rank == 0:
            _inject_failure(loop)
        if state.global_step % loop.config.checkpoint_every == 0:
            with clock.phase("checkpoint"):
                _save_checkpoint(engine, state, metrics, rank)
        elif state.global_step % loop.config.log_every == 0:
            with clock.phase("report"):
                ray.train.report(metrics)
        with clock.phase("report"):
            progress.update(state.global_step, note=_step_note(epoch, metrics))
    progress.finish()
    _export(engine, tokenizer, loop, rank)
    summary = _summary(state, metrics, engine)
    if rank == 0:
        _write_metrics(state.history, loop)
        # Ray Train's Result carries the metrics of the latest checkpoint, not of the last report.
        storage.write_json_atomic(storage.join(loop.config.out, SUMMARY_FILE), summary, loop.storage_options)
    ray.train.report({**metrics, **summary})


# ---------------------------------------------------------------- driver side


def _cpus_per_worker(config: FinetuneConfig) -> float:
    if config.cpus_per_worker:
        return config.cpus_per_worker
    if not is_local_ray(config.ray_address):
        return 1.0
    # Leave half a CPU for Ray Data's read tasks: a pool that takes every CPU starves them (docs/design.md).
    return max(0.25, ((os.cpu_count() or 1) - 0.5) / config.num_workers)


def _loop_config(checked: FinetunePlan) -> LoopConfig:
    config = checked.config
    resolved = dataclasses.replace(
        config,
        # Ray Train runs each worker in a directory of its own: every local path must be absolute.
        out=storage.absolute(config.out),
        checkpoints=config.checkpoints and storage.absolute(config.checkpoints),
        cpus_per_worker=_cpus_per_worker(config),
    )
    return LoopConfig(
        config=resolved,
        model=checked.model,
        teacher=checked.teacher,
        total_steps=checked.total_steps,
        storage_options=config.storage_options(),
        torch_extensions_dir=os.environ.get("TORCH_EXTENSIONS_DIR", str(models.cache_root() / "torch_extensions")),
    )


def build_trainer(checked: FinetunePlan):
    """The TorchTrainer for a checked plan (Ray must be running)."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    config = checked.config
    options = config.storage_options()
    source = storage.arrow_target([info.uri for info in checked.inputs], options)
    # Materialized once in the object store (a distilled set is small next to the model): workers then
    # stream blocks through get_dataset_shard with no read tasks of their own, which on a small machine
    # would wait for CPUs that the training workers hold.
    dataset = ray.data.read_parquet(
        source["path"], filesystem=source["filesystem"], columns=checked.columns, num_cpus=0.25
    )
    dataset.context.execution_options.preserve_order = True  # blocks in file order, not in finishing order
    dataset = dataset.materialize()
    ckpt_fs, ckpt_path = storage.pyarrow_filesystem(storage.absolute(config.checkpoint_uri), options)
    if not storage.is_remote(config.checkpoint_uri):
        os.makedirs(ckpt_path, exist_ok=True)
    loop = _loop_config(checked)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": loop.config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        # NCCL for GPU workers; gloo when the GPU configuration runs on CPU (core.placement.FORCE_CPU).
        torch_config=TorchConfig(backend="gloo" if cpu_forced() else None),
        run_config=ray.train.RunConfig(
            # Named by the config hash: rerunning the same config after a driver crash restores this run.
            name=f"finetune-{checked.digest}",
            storage_path=ckpt_path,
            storage_filesystem=ckpt_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_environment(loop)},
        ),
        datasets={"train": dataset},
        # Not split: every worker reads the same ordered stream and takes its micro-batches from it.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def _finetune(config: FinetuneConfig, checked: FinetunePlan, timer: manifest.Timer) -> Outcome:
    """Fit on Ray Train; core.stage.run_stage does the rest (an interrupted run of this config keeps its
    checkpoints, and Ray Train restores the run named by its digest from them)."""
    options = config.storage_options()
    logger.info(
        "fine-tuning %s on %d rows: %d steps, ZeRO-%d, %d workers%s%s",
        config.model, checked.rows, checked.total_steps, config.zero_stage, config.num_workers,
        f", LoRA r={config.lora_r}" if config.lora_r else "", f", KD w={config.kd_weight}" if config.kd_weight else "",
    )  # fmt: skip
    with timer("fit"):
        result = build_trainer(checked).fit()
    summary = storage.read_json(storage.join(config.out, SUMMARY_FILE), options)
    logger.info("fine-tuned %d steps, final loss %.4f; model in %s", summary["steps"], summary["final_loss"],
                storage.join(config.out, "model"))  # fmt: skip
    counts = {"rows": checked.rows, "steps": summary["steps"], "planned_steps": checked.total_steps,
              "samples": summary["samples"], "tokens": summary["tokens"]}  # fmt: skip
    extra = {
        "model": config.model,
        "final_loss": summary["final_loss"],
        "resumed_from_step": summary["resumed_from_step"],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    return Outcome(counts, extra)


FINETUNE: Stage[FinetuneConfig, FinetunePlan] = Stage(
    "finetune", plan, _finetune, reads=lambda config: [config.model, config.data, config.teacher or ""],
    keep=("checkpoints", ".fail_at_step_done"),
)  # fmt: skip


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune end to end and return the manifest (core.stage.run_stage: skips a finished run)."""
    return run_stage(FINETUNE, config)
