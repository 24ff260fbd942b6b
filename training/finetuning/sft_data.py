"""Supervised fine-tuning data: distilled rows to token ids with prompt-masked labels, and batch plans.

The distilled set (Parquet: id, prompt, original, teacher, accepted, reason, optionally response) gives
one training target per row: `response` when that column exists, else the teacher's rewrite where it was
accepted and the original answer otherwise.

Batching is a pure function of the row order, so a resumed run can skip to an exact position: rows are
grouped in windows of whole optimizer steps; inside a window they are sorted by length (length bucketing:
little padding) and cut into micro-batches, and the micro-batches are shuffled with a seed derived from
(seed, epoch, window). Micro-batch j of a window feeds step j // (accum * world), accumulation slot
(j // world) % accum, on rank j % world.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.finetuning.losses import IGNORE_INDEX

DISTILLED_COLUMNS = ("prompt", "original", "teacher", "accepted")


def training_target(row: dict[str, Any]) -> str | None:
    """The text to train on for one distilled row, or None when it has none.

    A non-empty `response` wins; otherwise the teacher's rewrite if it was accepted, else the original.
    """
    if row.get("response"):
        return str(row["response"])
    text = row.get("teacher") if row.get("accepted") else row.get("original")
    return str(text) if text else None


def encode_example(tokenizer: Any, prompt: str, response: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one (prompt, response) pair; prompt positions are labelled -100.

    With a chat template (SmolLM2-Instruct has one) the prompt is the user turn plus the generation prompt
    and the response is the rest of the rendered conversation (the assistant text and its end-of-turn
    token). Without one: BOS, prompt, response, EOS. Over max_tokens, the prompt keeps its last
    max_tokens // 2 tokens and the whole is cut to max_tokens, so some response always remains.
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if full_text.startswith(prompt_text):
            response_text = full_text[len(prompt_text) :]
        else:  # a template that rewrites earlier turns: fall back to appending the answer and EOS
            response_text = response + (tokenizer.eos_token or "")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + eos
    if len(prompt_ids) + len(response_ids) > max_tokens:
        prompt_ids = prompt_ids[-(max_tokens // 2) :] if len(prompt_ids) > max_tokens // 2 else prompt_ids
        response_ids = response_ids[: max_tokens - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (batch, tokens)."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class BatchShape:
    """How rows become optimizer steps."""

    micro_batch: int
    grad_accum: int
    world_size: int
    window_steps: int
    """Optimizer steps per length-bucketing window."""

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def window_rows(self) -> int:
        return self.rows_per_step * self.window_steps


def window_order(lengths: Sequence[int], shape: BatchShape, seed: int, epoch: int, window: int) -> list[list[int]]:
    """Micro-batches (lists of row indices into the window) in feeding order, for whole steps only.

    A window of n rows gives n // rows_per_step steps; the remaining rows (the end of an epoch) are left
    out. Rows are bucketed by length, and each step takes neighbouring buckets, so that every rank of a
    step pads to about the same width and none waits for the others at the gradient all-reduce; the
    steps are then shuffled. The result is a pure function of its arguments, which is what makes resuming
    exact.
    """
    steps = len(lengths) // shape.rows_per_step
    rng = random.Random(f"{seed}:{epoch}:{window}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    used = sorted(order[: steps * shape.rows_per_step], key=lambda i: (lengths[i], i))
    micro_batches = [used[i : i + shape.micro_batch] for i in range(0, len(used), shape.micro_batch)]
    per_step = shape.grad_accum * shape.world_size
    dealt = [_deal(micro_batches[i : i + per_step], shape.world_size) for i in range(0, len(micro_batches), per_step)]
    rng.shuffle(dealt)
    return [micro for step in dealt for micro in step]


def _deal(step: list[list[int]], world_size: int) -> list[list[int]]:
    """One step's micro-batches, shortest first, in the order `rank_micro_batches` hands them out, snaking:
    ranks take the accumulation slots in turn, every other slot in reverse, so no rank always gets the
    longest of each slot."""
    slots = [step[i : i + world_size] for i in range(0, len(step), world_size)]
    return [micro for n, slot in enumerate(slots) for micro in (slot[::-1] if n % 2 else slot)]


def rank_micro_batches(micro_batches: list[list[int]], shape: BatchShape, rank: int) -> list[list[list[int]]]:
    """For one rank: per step, its grad_accum micro-batches, in a window's order (window_order)."""
    per_step = shape.grad_accum * shape.world_size
    steps = len(micro_batches) // per_step
    return [
        [micro_batches[step * per_step + slot * shape.world_size + rank] for slot in range(shape.grad_accum)]
        for step in range(steps)
    ]
