"""Fine-tuning: data formatting, losses, DeepSpeed config, and Ray Train + DeepSpeed fits on 2 CPU workers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, build_tiny_model

from core import cli
from core.errors import ConfigError
from core.storage import StorageOptions
from training.finetuning.config import LoopConfig
from training.finetuning.deepspeed_config import build_deepspeed_config
from training.finetuning.finetune import FinetuneConfig, plan, run_finetune
from training.finetuning.losses import IGNORE_INDEX, causal_lm_loss, kd_loss
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
from training.finetuning.worker import merged_model

ROWS = 96


def loop_config(model_dir: str, **settings) -> LoopConfig:
    """What a Ray Train worker receives, for calling the loop's pieces directly."""
    config = FinetuneConfig(model=model_dir, data="unused.parquet", out="unused", **settings)
    return LoopConfig(config, model_dir, None, 1, StorageOptions(), "")


def write_distilled(directory: Path, rows: int = ROWS, with_response: bool = False) -> Path:
    """A distilled set with a planted task: the answer to `wA wB` (A, B < 10) is `w(A+100) w(B+100)`.

    Half the rows carry the answer as an accepted teacher rewrite, half as the original (rejected
    rewrite, whose teacher text is noise that must not be learned).
    """
    rng = random.Random(0)
    records = []
    for i in range(rows):
        a, b = rng.randrange(10), rng.randrange(10)
        answer = f"w{a + 100} w{b + 100}"
        accepted = i % 2 == 0
        records.append(
            {
                "id": f"r{i}",
                "prompt": f"w{a} w{b}",
                "original": answer if not accepted else "w199 w199",
                "teacher": answer if accepted else "w198 w198",
                "accepted": accepted,
                "reason": "" if accepted else "answer check failed",
            }
        )
    table = pa.Table.from_pylist(records)
    if with_response:
        table = table.append_column("response", pa.array([f"w{i % 50 + 150}" for i in range(rows)]))
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, rows // 2), directory / "part-0.parquet")
    pq.write_table(table.slice(rows // 2), directory / "part-1.parquet")
    return directory


def fit_config(model: str, data: Path, out: str, **overrides) -> FinetuneConfig:
    values = dict(
        model=model, data=str(data), out=out, epochs=2, micro_batch=4, grad_accum=1, window_steps=4, max_tokens=32,
        lr=5e-3, warmup_steps=2, checkpoint_every=5, log_every=5, cpus=0.5, threads=1, seed=1,
    )  # fmt: skip
    values.update(overrides)
    return FinetuneConfig(**values)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    return write_distilled(tmp_path_factory.mktemp("distilled"))


@pytest.fixture(scope="module")
def zero2_run(ray_local, tiny_model_dir, distilled, tmp_path_factory):
    """An uninterrupted ZeRO-2 run: the reference for the resume test."""
    out = tmp_path_factory.mktemp("zero2")
    result = run_finetune(fit_config(tiny_model_dir, distilled, str(out), zero_stage=2))
    return out, result


# ---------------------------------------------------------------- pure parts


def test_training_target_prefers_response_then_accepted_teacher():
    assert training_target({"response": "r", "teacher": "t", "accepted": True, "original": "o"}) == "r"
    assert training_target({"teacher": "t", "accepted": True, "original": "o"}) == "t"
    assert training_target({"teacher": "t", "accepted": False, "original": "o"}) == "o"
    assert training_target({"response": None, "teacher": "t", "accepted": False, "original": "o"}) == "o"
    assert training_target({"teacher": None, "accepted": True, "original": "o"}) is None


def test_prompt_masking_on_one_batch(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [
        Example(*encode_example(tokenizer, "w1 w2 w3", "w4 w5", 32)),
        Example(*encode_example(tokenizer, "w6", "w7", 32)),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    vocab = tokenizer.get_vocab()
    # Row 0: <s> w1 w2 w3 | w4 w5 </s>; row 1: <s> w6 | w7 </s> and three pads.
    expected_labels = [
        [IGNORE_INDEX] * 4 + [vocab["w4"], vocab["w5"], tokenizer.eos_token_id],
        [IGNORE_INDEX] * 2 + [vocab["w7"], tokenizer.eos_token_id] + [IGNORE_INDEX] * 3,
    ]
    assert batch["labels"].tolist() == expected_labels
    assert batch["input_ids"][0].tolist() == [
        tokenizer.bos_token_id,
        vocab["w1"],
        vocab["w2"],
        vocab["w3"],
        *expected_labels[0][4:],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert batch["input_ids"][1, 4:].tolist() == [tokenizer.pad_token_id] * 3


def test_chat_template_masks_the_rendered_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }} {% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<s> {% endif %}"
    )
    ids, labels = encode_example(tokenizer, "w1 w2", "w3", 32)
    vocab = tokenizer.get_vocab()
    assert ids == [
        tokenizer.bos_token_id,
        vocab["w1"],
        vocab["w2"],
        tokenizer.bos_token_id,
        vocab["w3"],
        tokenizer.eos_token_id,
    ]
    assert labels == [IGNORE_INDEX] * 4 + [vocab["w3"], tokenizer.eos_token_id]


def test_long_examples_keep_a_response(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = " ".join(f"w{i}" for i in range(40))
    ids, labels = encode_example(tokenizer, prompt, "w100 w101", 16)
    assert len(ids) == 11 and labels[:8] == [IGNORE_INDEX] * 8  # the prompt keeps its last 16 // 2 tokens
    assert ids[:8] == tokenizer(" ".join(f"w{i}" for i in range(32, 40)), add_special_tokens=False)["input_ids"]


def test_window_plan_covers_rows_once_and_is_deterministic():
    shape = BatchShape(micro_batch=2, grad_accum=2, world_size=2, window_steps=3)
    lengths = [random.Random(i).randrange(5, 50) for i in range(27)]  # 3 whole steps of 8 rows, 3 left over
    order_a = window_order(lengths, shape, seed=0, epoch=0, window=0)
    assert order_a == window_order(lengths, shape, seed=0, epoch=0, window=0)
    assert order_a != window_order(lengths, shape, seed=0, epoch=1, window=0)
    rows = [i for micro in order_a for i in micro]
    assert len(rows) == len(set(rows)) == 24
    per_rank = [rank_micro_batches(order_a, shape, rank) for rank in range(2)]
    assert all(len(steps) == 3 and all(len(step) == 2 for step in steps) for steps in per_rank)
    fed = sorted(i for steps in per_rank for step in steps for micro in step for i in micro)
    assert fed == sorted(rows)
    # Length bucketing: each micro-batch holds neighbours in the length order.
    spread = max(max(lengths[i] for i in micro) - min(lengths[i] for i in micro) for micro in order_a)
    assert spread < max(lengths) - min(lengths)
    # Balanced ranks: each step's rows are neighbours in the length order, and the ranks snake through the
    # accumulation slots, so rank 0 takes the step's shortest micro-batch and then its longest.
    by_length = sorted(rows, key=lambda i: (lengths[i], i))
    for step in range(3):
        step_micros = [per_rank[rank][step] for rank in range(2)]
        positions = sorted(by_length.index(i) for micros in step_micros for micro in micros for i in micro)
        assert positions == list(range(positions[0], positions[0] + 8))
        ordered = sorted((micro for micros in step_micros for micro in micros), key=lambda m: by_length.index(m[0]))
        assert per_rank[0][step] == [ordered[0], ordered[-1]]


class ListShard:
    """Stands in for a Ray DataIterator: the same rows in the same order on every pass."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size: int, batch_format: str):
        yield from self.table.to_batches(max_chunksize=batch_size)


def test_resume_skips_exactly_the_steps_already_done(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from training.finetuning.checkpoints import TrainerState
    from training.finetuning.worker import _steps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shard = ListShard(pq.read_table(write_distilled(tmp_path / "d", rows=40)))
    shape = BatchShape(micro_batch=2, grad_accum=2, world_size=2, window_steps=3)  # 8 rows a step, 5 a epoch
    loop = loop_config(tiny_model_dir, epochs=2, seed=3, max_tokens=32)

    def fed(state: TrainerState, rank: int) -> list[tuple[int, int, list[list[int]]]]:
        return [
            (epoch, step, [batch["input_ids"].tolist() for batch in micro])
            for epoch, step, micro in _steps(shard, tokenizer, loop, shape, state, rank)
        ]

    for rank in range(2):
        full = fed(TrainerState(), rank)
        assert [(epoch, step) for epoch, step, _ in full] == [(e, s) for e in range(2) for s in range(5)]
        for done in (1, 3, 4, 5, 7):  # inside a window, at a window's end, at an epoch's end, in epoch 2
            # As the loop records it: the epoch of the last step done, and the steps done in that epoch.
            state = TrainerState(global_step=done, epoch=(done - 1) // 5, step_in_epoch=(done - 1) % 5 + 1)
            assert fed(state, rank) == full[done:], (rank, done)
    rank_rows = [
        sorted(row for _, _, micro in fed(TrainerState(), rank) for batch in micro for row in batch)
        for rank in range(2)
    ]
    assert rank_rows[0] != rank_rows[1]  # the ranks see different micro-batches


def test_causal_lm_loss_counts_only_labelled_positions():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    loss, count = causal_lm_loss(logits, labels)
    picked = [(0, 1, 3), (0, 2, 4), (1, 0, 1), (1, 1, 2), (1, 2, 3), (1, 3, 4)]
    expected = torch.stack([-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in picked]).mean()
    assert count.item() == 6 and torch.allclose(loss, expected)


def test_kd_loss_is_zero_for_identical_models_and_positive_otherwise():
    student = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [1, 2, 3], [IGNORE_INDEX] * 2 + [1, 2, 3, 4]])
    assert kd_loss(student, student.clone(), labels, temperature=2.0).abs().item() < 1e-6
    other = student + torch.randn_like(student)
    assert kd_loss(student, other, labels).item() > 0.01
    # Masked positions do not count: changing the teacher there changes nothing.
    masked = student.clone()
    masked[:, :2] += 5.0
    assert kd_loss(student, masked, labels).abs().item() < 1e-6


def test_deepspeed_config_from_typed_config():
    cpu = build_deepspeed_config(
        zero_stage=3, micro_batch=4, grad_accum=2, world_size=2, grad_clip=0.5, bf16=False,
        total_steps=100, warmup_steps=0, min_lr_ratio=0.1,
    )  # fmt: skip
    assert cpu["train_batch_size"] == 16 and cpu["gradient_clipping"] == 0.5
    assert cpu["zero_optimization"]["stage"] == 3 and cpu["zero_allow_untested_optimizer"] is True
    assert "bf16" not in cpu and cpu["scheduler"]["params"]["warmup_num_steps"] == 1
    gpu = build_deepspeed_config(
        zero_stage=2, micro_batch=1, grad_accum=1, world_size=8, grad_clip=1.0, bf16=True,
        total_steps=10, warmup_steps=2, min_lr_ratio=0.0,
    )  # fmt: skip
    assert (
        gpu["bf16"] == {"enabled": True} and "stage3_gather_16bit_weights_on_model_save" not in gpu["zero_optimization"]
    )
    settings = dict(micro_batch=2, grad_accum=4, world_size=2, grad_clip=1.0, bf16=False, total_steps=10)
    stage1 = build_deepspeed_config(zero_stage=1, warmup_steps=0, min_lr_ratio=0.0, **settings)
    assert stage1["zero_optimization"]["stage"] == 1 and stage1["train_batch_size"] == 16
    with pytest.raises(ValueError, match="zero_stage=4 must be 1, 2 or 3"):
        build_deepspeed_config(zero_stage=4, warmup_steps=0, min_lr_ratio=0.0, **settings)


def test_step_clock_tiles_the_lap_and_takes_nested_phases_out_of_their_parent():
    now = [0.0]

    def tick(seconds: float) -> None:
        now[0] += seconds

    clock = StepClock(clock=lambda: now[0])
    tick(0.5)  # outside every phase: "other"
    with clock.phase("data"):
        tick(1.0)
    with clock.phase("backward"):
        tick(2.0)
        reduce = clock.wrap("grad_reduce", lambda: tick(0.25))
        reduce()
        tick(1.0)
    with clock.phase("optimizer"):
        tick(0.75)
    lap = clock.lap()
    assert list(lap) == list(PHASES)
    assert lap["data"] == 1.0 and lap["backward"] == 3.0 and lap["grad_reduce"] == 0.25
    assert lap["optimizer"] == 0.75 and lap["other"] == 0.5 and sum(lap.values()) == 5.5
    tick(2.0)
    assert clock.lap() == {**dict.fromkeys(PHASES, 0.0), "other": 2.0}  # reset at every lap
    with pytest.raises(ValueError, match="unknown step phase"):
        with clock.phase("other"):
            pass


def test_worker_threads_and_environment_follow_the_settings(tiny_model_dir):
    from training.finetuning.worker import worker_environment

    # Two workers on two cores reserve 0.75 CPU each: one thread each, never more threads than cores.
    assert worker_environment(loop_config(tiny_model_dir, cpus=0.75)) == {
        "OMP_NUM_THREADS": "1",
        "RAY_worker_niceness": "0",
    }
    assert worker_environment(loop_config(tiny_model_dir, cpus=2.0))["OMP_NUM_THREADS"] == "2"
    explicit = loop_config(tiny_model_dir, cpus=0.5, threads=3)
    assert worker_environment(explicit)["OMP_NUM_THREADS"] == "3"


def test_lora_merge_gives_the_adapter_models_logits(tiny_model_dir, one_torch_thread):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from training.finetuning.worker import _lora_config

    loop = loop_config(tiny_model_dir, lora_r=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj", "down_proj"])
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _lora_config(loop))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        merged = merged_model(loop, adapted.state_dict())
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        assert not any("lora" in name for name in merged.state_dict())
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert not torch.allclose(base, expected, atol=1e-3)


def test_config_errors_name_the_field(tmp_path, tiny_model_dir):
    data = write_distilled(tmp_path / "d", rows=16)
    with pytest.raises(ConfigError, match="zero_stage"):
        fit_config(tiny_model_dir, data, str(tmp_path / "o"), zero_stage=4)
    with pytest.raises(ConfigError, match="teacher"):
        fit_config(tiny_model_dir, data, str(tmp_path / "o"), kd_weight=0.5)
    with pytest.raises(ConfigError, match="kd_weight"):
        fit_config(tiny_model_dir, data, str(tmp_path / "o"), kd_weight=1.5, teacher=tiny_model_dir)
    with pytest.raises(ConfigError, match="^model="):
        plan(fit_config(str(tmp_path / "nope"), data, str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="do not fill one step"):
        plan(fit_config(tiny_model_dir, data, str(tmp_path / "o"), micro_batch=16))
    pq.write_table(pa.table({"prompt": ["a"], "text": ["b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="lacks the columns"):
        plan(fit_config(tiny_model_dir, tmp_path / "bad.parquet", str(tmp_path / "o")))
    other_vocab = build_tiny_model(tmp_path / "other", num_layers=1)
    config = json.loads((other_vocab / "config.json").read_text())
    config["vocab_size"] += 8
    (other_vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="same tokenizer"):
        plan(fit_config(tiny_model_dir, data, str(tmp_path / "o"), kd_weight=0.5, teacher=str(other_vocab)))


# ---------------------------------------------------------------- Ray Train + DeepSpeed fits


@pytest.mark.timeout(600)
def test_zero2_learns_the_planted_task_and_exports(zero2_run, distilled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = zero2_run
    metrics = read_metrics(out)
    assert [row["step"] for row in metrics] == list(range(1, 25))  # 2 epochs x 96 rows / 8 rows per step
    first, last = metrics[0]["loss"], sum(row["loss"] for row in metrics[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert all(row["tokens_per_s"] > 0 for row in metrics)
    assert metrics[0]["lr"] < metrics[2]["lr"] <= 5e-3 and metrics[-1]["lr"] < metrics[2]["lr"]  # warm-up, decay
    assert result["stage"] == "finetune" and result["counts"]["steps"] == 24
    # The finished run's resume state is gone (model/ is its result); it was written (checkpoint_every=5).
    assert result["checkpoint"] is None and not list((out / "checkpoints").glob("finetune-*"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("w3 w7", add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    logits[tokenizer.all_special_ids] = -float("inf")
    # The first answer word is in the task's answer range, w100..w109 (24 tiny steps do not learn which one).
    assert tokenizer.convert_ids_to_tokens(logits.argmax().item()).startswith("w10")


@pytest.mark.timeout(600)
def test_zero1_takes_the_same_steps_as_zero2_and_resumes(zero2_run, tiny_model_dir, distilled, tmp_path):
    """ZeRO-1 averages the gradients once per optimizer step instead of after every micro-batch: the same
    AdamW on the same averaged gradients, so the same losses and the same exported weights, here through a
    failure and a resume from a ZeRO-1 checkpoint."""
    from transformers import AutoModelForCausalLM

    reference, _ = zero2_run
    out = tmp_path / "zero1"
    shared = tmp_path / "checkpoints"  # a checkpoint store of the user's, holding a file of theirs
    shared.mkdir()
    (shared / "notes.txt").write_text("mine")
    config = fit_config(tiny_model_dir, distilled, str(out), zero_stage=1, fail_at_step=8, checkpoints=str(shared))
    result = run_finetune(config)
    assert result["resumed_from_step"] == 5 and result["counts"]["steps"] == 24
    # Resumed from the run's checkpoint, then its directory removed once finished; the user's file stays.
    assert sorted(path.name for path in shared.iterdir() if not path.name.startswith(".")) == ["notes.txt"]
    assert (shared / "notes.txt").read_text() == "mine"
    metrics = read_metrics(out)
    assert [row["step"] for row in metrics] == list(range(1, 25))
    assert [row["loss"] for row in metrics] == pytest.approx([row["loss"] for row in read_metrics(reference)], rel=1e-3)
    assert all(row["phases_s"]["grad_reduce"] > 0 for row in metrics)
    ours = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(reference / "model").state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[name], theirs[name], atol=1e-4) for name in ours)


def test_step_breakdown_sums_to_the_step_time_and_workers_use_the_set_threads(zero2_run):
    out, _ = zero2_run
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["threads"] == 1 and summary["omp_num_threads"] == "1"  # fit_config: threads=1
    assert summary["niceness"] == 0
    assert summary["optimizer"] == "AdamW, fused"  # one pass per partition, not several
    for row in read_metrics(out):
        assert sorted(row["phases_s"]) == sorted(PHASES)  # metrics.jsonl sorts its keys
        assert all(seconds >= 0 for seconds in row["phases_s"].values())
        assert sum(row["phases_s"].values()) == pytest.approx(row["step_s"], rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"])
        assert row["phases_s"]["forward"] > 0 and row["phases_s"]["grad_reduce"] > 0 and row["wait_s"] >= 0
    assert any(row["phases_s"]["checkpoint"] > 0 for row in read_metrics(out))  # checkpoint_every=5


@pytest.mark.timeout(600)
def test_run_killed_midway_resumes_to_the_same_loss(zero2_run, tiny_model_dir, distilled, tmp_path):
    reference = read_metrics(zero2_run[0])
    out = tmp_path / "resumed"
    result = run_finetune(fit_config(tiny_model_dir, distilled, str(out), zero_stage=2, fail_at_step=8))
    assert result["resumed_from_step"] == 5  # the checkpoint before the failure
    resumed = read_metrics(out)
    assert [row["step"] for row in resumed] == list(range(1, 25))  # no step lost or repeated
    assert [row["samples"] for row in resumed] == [row["samples"] for row in reference]
    for mine, theirs in zip(resumed, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-3, abs=1e-4), mine["step"]


@pytest.mark.timeout(600)
def test_zero3_with_checkpoints_on_s3(ray_local, s3_bucket, tiny_model_dir, distilled, tmp_path):
    from transformers import AutoModelForCausalLM

    from core import storage

    out = f"s3://{s3_bucket}/finetune"
    config = fit_config(tiny_model_dir, distilled, out, zero_stage=3, epochs=1, keep_checkpoints_when_done=True)
    result = run_finetune(config)
    assert result["counts"]["steps"] == 12 and result["checkpoint"].endswith("step_00000010")
    checkpoints = [info.uri for info in storage.expand(f"{out}/checkpoints", config_field="checkpoints")]
    assert any(uri.endswith("step_00000010/trainer_state.json") for uri in checkpoints)
    assert any("zero_pp_rank_1" in uri for uri in checkpoints)  # both ranks' shards merged in one checkpoint
    metrics = [json.loads(line) for line in storage.open_read(f"{out}/metrics.jsonl").read().decode().splitlines()]
    assert metrics[-1]["loss"] < 0.75 * metrics[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(storage.local_copy(f"{out}/model"))
    assert model.config.num_hidden_layers == 4


@pytest.mark.timeout(600)
def test_job_with_lora_and_kd_as_subprocess(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_distilled(tmp_path / "distilled", rows=48, with_response=True)
    overrides = tmp_path / "finetune.yaml"
    overrides.write_text(
        "epochs: 1\nmicro_batch: 4\nwindow_steps: 2\nmax_tokens: 32\ncpus: 0.5\nlr: 0.003\n"
        "lora_targets: [q_proj, v_proj]\n"
    )
    out = tmp_path / "out"
    # Relative paths, as a user types them (Ray Train runs its workers in directories of their own).
    model = os.path.relpath(tiny_model_dir, tmp_path)
    job = [sys.executable, "-m", "jobs.finetune", "--model", model, "--data", data.name, "--out", out.name]
    args = [*job, "--config", overrides.name, "--zero-stage", "3", "--kd-weight", "0.5", "--teacher", model,
            "--lora-r", "4"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = read_metrics(out)
    assert len(metrics) == 6
    assert metrics[0]["kd"] < 1e-4  # student starts equal to the teacher (LoRA B = 0)
    # Step 1 runs at lr 0 (warm-up), so the student leaves the teacher from step 3 on and KD grows.
    assert metrics[-1]["kd"] > metrics[2]["kd"] >= 0 and metrics[-1]["kd"] > 1e-5
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["config"]["lora_r"] == 4
    bad = subprocess.run([*job, "--zero-stage", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "zero_stage" in bad.stderr


def test_shipped_config_loads():
    values = cli.load_yaml(str(REPO / "jobs" / "configs" / "demo-finetune.yaml"))
    config = cli.from_mapping(FinetuneConfig, {"model": "m", "data": "d", "out": "o", **values})
    assert config.zero_stage in (1, 2, 3)


def test_worker_plan_carries_no_s3_credentials(tiny_model_dir, distilled, tmp_path, monkeypatch):
    """What TorchTrainer ships to every worker (train_loop_config) holds the endpoint but no credentials."""
    import ray.cloudpickle

    from training.finetuning.finetune import _loop_config

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFINESCOPECANARY7")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "finescope-canary-secret-3f9c1d7e5b")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    loop = _loop_config(plan(fit_config(tiny_model_dir, distilled, str(tmp_path / "o"))))
    shipped = ray.cloudpickle.dumps({"loop": loop})
    assert b"AKIAFINESCOPECANARY7" not in shipped and b"finescope-canary-secret" not in shipped
    assert ray.cloudpickle.loads(shipped)["loop"].storage_options.endpoint_url == "http://127.0.0.1:9"


RESUME_PROBE = r"""
import json, os, sys
import torch
import deepspeed  # noqa: F401
# One rank needs no collective: skip building DeepSpeed's CPU shared-memory op, which only speeds them up.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
import ray.train
from conftest import build_tiny_model
from core.storage import StorageOptions
from training.finetuning import checkpoints, worker
from training.finetuning.config import FinetuneConfig, LoopConfig

work, marker = sys.argv[1], sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
model_dir = str(build_tiny_model(__import__("pathlib").Path(work) / "model", num_layers=1))
config = FinetuneConfig(model=model_dir, data="unused.parquet", out=work, zero_stage=2, threads=1)
loop = LoopConfig(config, model_dir, None, 10, StorageOptions(), "")
model, _ = worker._build_model(loop)
engine = worker._build_engine(model, loop, 1)
checkpoint = os.path.join(work, "checkpoint")
engine.save_checkpoint(checkpoint, tag=checkpoints.DS_TAG)  # what save_checkpoint writes, before Ray Train uploads it
with open(os.path.join(checkpoint, checkpoints.STATE_FILE), "w") as handle:
    json.dump({"global_step": 7, "epoch": 1, "step_in_epoch": 2}, handle)
ray.train.get_checkpoint = lambda: ray.train.Checkpoint.from_directory(checkpoint)
report = {"clean_step": checkpoints.restore(engine, loop).global_step}


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {marker}",)


torch.save({"module": Payload()}, os.path.join(checkpoint, checkpoints.DS_TAG, "mp_rank_00_model_states.pt"))
try:
    report["tampered_step"] = checkpoints.restore(engine, loop).global_step
except Exception as error:
    report["error"] = [type(error).__name__, str(error)]
print("REPORT " + json.dumps(report))
"""


@pytest.mark.timeout(300)
def test_resume_refuses_a_planted_pickle(tmp_path):
    """A checkpoint written by a real DeepSpeed save loads; the same checkpoint with one file replaced by a
    pickle whose __reduce__ runs a command is refused with an error naming the file, and nothing runs."""
    from conftest import free_port

    marker = tmp_path / "payload-ran"
    script = tmp_path / "probe.py"
    script.write_text(RESUME_PROBE)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(marker), str(free_port())],
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert not marker.exists(), "the planted pickle ran"
    assert report["clean_step"] == 7  # the untampered checkpoint resumes
    assert "tampered_step" not in report
    kind, message = report["error"]
    assert kind == "CheckpointRefused" and "mp_rank_00_model_states.pt" in message and "posix.system" in message
