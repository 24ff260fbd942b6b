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

Modules: `config.py` (the settings, and what each worker runs from), `worker.py` (the training loop on each
worker), `checkpoints.py` (checkpoint contents, writing, safe loading), this module (the plan and the Ray
Train wiring on the driver), with `sft_data.py`, `losses.py`, `deepspeed_config.py` and `step_clock.py`.

Outputs under `out`: model/ (HF directory: weights with LoRA merged, tokenizer), metrics.jsonl,
checkpoints/ (Ray Train, unless `checkpoints` points elsewhere) and, last, manifest.json.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from core import manifest, models, storage
from core.errors import ConfigError
from core.placement import cpu_forced
from core.runtime import is_local_ray
from core.stage import Outcome, Stage, run_stage
from training.finetuning.config import SUMMARY_FILE, FinetuneConfig, LoopConfig
from training.finetuning.sft_data import DISTILLED_COLUMNS
from training.finetuning.worker import train_loop_per_worker, worker_environment

logger = logging.getLogger(__name__)

DATA_READS = {"distill": "distilled"}
"""--data may name a distill output root: its distilled/ is read (never its parts/ or rejects/)."""


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
    rows_per_step = config.micro_batch * config.grad_accum * config.actors
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


def _worker_cpus(config: FinetuneConfig) -> float:
    if config.cpus:
        return config.cpus
    if not is_local_ray(config.ray_address):
        return 1.0
    # Leave half a CPU for Ray Data's read tasks: a pool that takes every CPU starves them (docs/design.md).
    return max(0.25, ((os.cpu_count() or 1) - 0.5) / config.actors)


def _loop_config(checked: FinetunePlan) -> LoopConfig:
    config = checked.config
    resolved = dataclasses.replace(
        config,
        # Ray Train runs each worker in a directory of its own: every local path must be absolute.
        out=storage.absolute(config.out),
        checkpoints=config.checkpoints and storage.absolute(config.checkpoints),
        cpus=_worker_cpus(config),
    )
    return LoopConfig(
        config=resolved,
        model=checked.model,
        teacher=checked.teacher,
        total_steps=checked.total_steps,
        storage_options=config.storage_options(),
        torch_extensions_dir=os.environ.get("TORCH_EXTENSIONS_DIR", str(models.cache_root() / "torch_extensions")),
    )


def run_name(digest: str) -> str:
    """Ray Train's name for the run of a config: its checkpoints live under `checkpoint_uri`/this name."""
    return f"finetune-{digest}"


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
            num_workers=config.actors,
            use_gpu=bool(config.gpus),
            resources_per_worker={"CPU": loop.config.cpus, **({"GPU": 1} if config.gpus else {})},
        ),
        # NCCL for GPU workers; gloo when the GPU configuration runs on CPU (core.placement.FORCE_CPU).
        torch_config=TorchConfig(backend="gloo" if cpu_forced() else None),
        run_config=ray.train.RunConfig(
            # Named by the config hash: rerunning the same config after a driver crash restores this run.
            name=run_name(checked.digest),
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
        config.model, checked.rows, checked.total_steps, config.zero_stage, config.actors,
        f", LoRA r={config.lora_r}" if config.lora_r else "", f", KD w={config.kd_weight}" if config.kd_weight else "",
    )  # fmt: skip
    with timer("fit"):
        result = build_trainer(checked).fit()
    summary = storage.read_json(storage.join(config.out, SUMMARY_FILE), options)
    logger.info("fine-tuned %d steps, final loss %.4f; model in %s", summary["steps"], summary["final_loss"],
                storage.join(config.out, "model"))  # fmt: skip
    counts = {"rows": checked.rows, "steps": summary["steps"], "planned_steps": checked.total_steps,
              "samples": summary["samples"], "tokens": summary["tokens"]}  # fmt: skip
    if not config.keep_checkpoints_when_done:
        _remove_run_checkpoints(config, checked.digest)
    kept = result.checkpoint and config.keep_checkpoints_when_done
    extra = {
        "model": config.model,
        "final_loss": summary["final_loss"],
        "resumed_from_step": summary["resumed_from_step"],
        "checkpoint": result.checkpoint.path if kept else None,
    }
    return Outcome(counts, extra)


def _remove_run_checkpoints(config: FinetuneConfig, digest: str) -> None:
    """Remove this run's directory under the checkpoint storage (Ray Train's run named by the digest), and
    nothing else there: the resume state of a finished run, which no later run reads."""
    options = config.storage_options()
    run_dir = storage.join(storage.absolute(config.checkpoint_uri), run_name(digest))
    storage.remove(run_dir, options)
    logger.info("removed the finished run's checkpoints, %s (--keep-checkpoints-when-done keeps them)", run_dir)


FINETUNE: Stage[FinetuneConfig, FinetunePlan] = Stage(
    "finetune", plan, _finetune, reads=lambda config: [config.model, config.data, config.teacher or ""],
    keep=("checkpoints", ".fail_at_step_done"),
)  # fmt: skip


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune end to end and return the manifest (core.stage.run_stage: skips a finished run)."""
    return run_stage(FINETUNE, config)


__all__ = ["FinetuneConfig", "FinetunePlan", "SUMMARY_FILE", "build_trainer", "plan", "run_finetune"]
