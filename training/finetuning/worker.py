"""What each Ray Train worker runs: build the model and DeepSpeed engine, restore, stream the rows in a
fixed order, train, checkpoint, export (training/finetuning/finetune.py says why the order is fixed)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from core import models, storage
from core.placement import record_model_load, shape_free_attention, worker_device
from core.progress import Progress
from training.finetuning.checkpoints import TrainerState, restore, save_checkpoint
from training.finetuning.config import ALL_LINEAR, SUMMARY_FILE, LoopConfig
from training.finetuning.deepspeed_config import build_deepspeed_config
from training.finetuning.losses import causal_lm_loss, combined_loss, kd_loss
from training.finetuning.sft_data import (
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


def _worker_threads(loop: LoopConfig) -> int:
    """Torch threads per worker: `threads`, else one per whole CPU the worker reserves (at least one).

    Two workers on two cores thus run one thread each: more would oversubscribe the cores.
    """
    if loop.config.threads:
        return loop.config.threads
    return max(1, int(loop.config.cpus))


def worker_environment(loop: LoopConfig) -> dict[str, str]:
    """Environment of the Ray Train worker processes.

    OpenMP gets the worker's thread count (Ray would set one per whole CPU reserved, which disagrees with
    `threads` when that is set). Ray starts worker processes at niceness 15; a training worker holds
    its CPUs for the whole fit and every step waits for the slowest worker, so it runs at normal priority:
    otherwise any other process on the node, Ray's own daemons included, preempts it and stalls them all.
    """
    return {"OMP_NUM_THREADS": str(_worker_threads(loop)), "RAY_worker_niceness": "0"}


def _worker_device(loop: LoopConfig) -> str:
    """cuda for a worker given a GPU (`gpus`), unless FINESCOPE_FORCE_CPU; it also decides bf16."""
    return worker_device(loop.config.gpus)


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
        # peft takes every linear layer as the string itself, not in a list.
        target_modules=ALL_LINEAR if loop.config.lora_targets == [ALL_LINEAR] else loop.config.lora_targets,
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
        "threads": torch.get_num_threads(),
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
    state = restore(engine, loop)
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
                save_checkpoint(engine, state, metrics, rank)
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
