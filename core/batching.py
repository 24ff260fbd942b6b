"""Token batching shared by every model stage: length-bucketed micro-batches, right padding, tokenization."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from core import models
from core.storage import StorageOptions


def length_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int = 64, max_padding: float = 0.2
) -> list[list[int]]:
    """Group row indices into micro-batches of similar length.

    Rows are sorted by length and cut so that (rows x longest row) stays within `max_batch_tokens`
    and no row is padded by more than `max_padding` of the micro-batch's longest row: each micro-batch
    pads only to its own longest row, and that row is close to all the others.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        full = (len(current) + 1) * longest > max_batch_tokens or len(current) >= max_batch_size
        wasteful = lengths[index] < (1 - max_padding) * longest
        if current and (full or wasteful):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_right(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (batch, longest) ids and attention mask, padded on the right."""
    longest = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def tokenize_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Texts -> token-id lists, each cut to `max_tokens`."""
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
    return [list(ids) for ids in encoded["input_ids"]]


@functools.lru_cache(maxsize=4)
def cached_tokenizer(model: str, options: StorageOptions | None = None):
    """One tokenizer per model per process: Ray Data tasks reuse their worker, and loading costs a second.
    `options` reach a model on S3 (the job's endpoint and region)."""
    return models.load_tokenizer(model, options)


def tokenize_batch(
    batch: dict[str, np.ndarray], model: str, max_tokens: int, options: StorageOptions | None = None
) -> dict[str, np.ndarray]:
    """Ray Data task: add `input_ids` (cut to max_tokens) and `n_tokens`."""
    ids = tokenize_texts(cached_tokenizer(model, options), batch["text"].tolist(), max_tokens)
    column = np.empty(len(ids), dtype=object)
    column[:] = [np.asarray(row, dtype=np.int32) for row in ids]
    batch["input_ids"] = column
    batch["n_tokens"] = np.array([len(row) for row in ids], dtype=np.int32)
    return batch
