"""Domain perplexity on held-out documents: token-weighted, with a sliding window for long documents.

Perplexity is exp(total negative log-likelihood / total scored tokens) over all documents, so a long
document weighs by its tokens (token-weighted), not as one vote. A document is tokenized without special
tokens and its first token is not scored (nothing predicts it), so a document of n tokens scores n - 1.

A document longer than `window` tokens is read in windows that start every `stride` tokens (the sliding
window of Hugging Face's "Perplexity of fixed-length models"): each window scores only the tokens that the
previous window did not, so every token is scored exactly once, with at least `window - stride` tokens of
context once the first window is past. A document that fits in one window is scored in one plain forward.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core import storage
from core.batching import length_batches, pad_right
from core.errors import ConfigError
from core.progress import Progress
from core.reader import CleanConfig, iter_shard
from core.storage import StorageOptions
from training.evaluation.likelihood import token_logprobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A slice of one document: its tokens, and from which index on they are scored."""

    doc: int
    tokens: list[int]
    first_scored: int
    """Index within `tokens` of the first scored token (always >= 1)."""


def sliding_windows(doc: int, tokens: Sequence[int], window: int, stride: int) -> list[Window]:
    """Windows of at most `window` tokens starting every `stride` tokens; each token (but the first) is
    scored in exactly one window."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in 1..window={window}")
    windows: list[Window] = []
    scored_up_to = 1  # tokens before this index are scored already (token 0 never is)
    begin = 0
    while scored_up_to < len(tokens):
        end = min(begin + window, len(tokens))
        if end > scored_up_to:
            windows.append(Window(doc, list(tokens[begin:end]), max(scored_up_to - begin, 1)))
            scored_up_to = end
        begin += stride
    return windows


@torch.inference_mode()
def window_nll(model: nn.Module, windows: Sequence[Window], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One forward over a batch of windows -> per window (summed negative log-likelihood, scored tokens)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_right([w.tokens for w in windows], pad_id)
    hidden = (
        model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).last_hidden_state  # (windows, tokens, d_model)
    )
    rows = [i for i, w in enumerate(windows) for _ in range(w.first_scored, len(w.tokens))]
    positions = [p for w in windows for p in range(w.first_scored, len(w.tokens))]
    rows_t, positions_t = torch.as_tensor(rows), torch.as_tensor(positions)
    targets = input_ids[rows_t, positions_t].to(device)
    logprobs = token_logprobs(model, hidden[rows_t.to(device), (positions_t - 1).to(device)], targets)
    nll = torch.zeros(len(windows), dtype=torch.float64).index_add_(0, rows_t, -logprobs.cpu().double())
    counts = np.array([len(w.tokens) - w.first_scored for w in windows])
    return nll.numpy(), counts


def document_nll(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    window: int,
    stride: int,
    max_batch_tokens: int = 8192,
    label: str = "perplexity",
) -> tuple[np.ndarray, np.ndarray]:
    """Per document: summed negative log-likelihood (nats) and scored tokens, over sliding windows.

    Progress lines (windows scored of all, rate, ETA) start with `label`."""
    windows = [w for doc, tokens in enumerate(token_lists) for w in sliding_windows(doc, tokens, window, stride)]
    nll = np.zeros(len(token_lists))
    counts = np.zeros(len(token_lists), dtype=np.int64)
    if not windows:
        return nll, counts
    lengths = [len(w.tokens) for w in windows]
    with Progress(label, len(windows), "windows") as progress:
        for indices in length_batches(lengths, max(max_batch_tokens, max(lengths))):
            batch_nll, batch_counts = window_nll(model, [windows[i] for i in indices], pad_id)
            for i, value, count in zip(indices, batch_nll, batch_counts, strict=True):
                nll[windows[i].doc] += value
                counts[windows[i].doc] += count
            progress.add(len(indices))
    return nll, counts


def perplexity(nll: np.ndarray, counts: np.ndarray) -> float:
    """Token-weighted perplexity of documents with summed NLLs `nll` over `counts` tokens."""
    total = int(np.sum(counts))
    return float(np.exp(np.sum(nll) / total)) if total else float("nan")


def _topic(meta_json: str) -> str | None:
    try:
        meta = json.loads(meta_json)
    except ValueError:
        return None
    return meta.get("topic") if isinstance(meta, dict) else None


def load_documents(
    paths: Sequence[str],
    topic: str | None = None,
    max_docs: int | None = None,
    options: StorageOptions | None = None,
) -> tuple[list[str], dict[str, int]]:
    """Texts of held-out documents (Parquet with `text`, or RedPajama JSONL, plain/.gz/.zst; paths,
    directories or globs), optionally only those whose `meta.topic` is `topic`. Returns the texts and
    counts of what was skipped, by reason."""
    texts, _, skipped = load_labelled_documents(paths, topic, max_docs, options)
    return texts, skipped


def load_labelled_documents(
    paths: Sequence[str],
    topic: str | None = None,
    max_docs: int | None = None,
    options: StorageOptions | None = None,
) -> tuple[list[str], list[str | None], dict[str, int]]:
    """`load_documents`, with each kept document's `meta.topic` (None where it has none) beside its text:
    the continuation task draws a question's distractors from documents of its topic."""
    skipped: dict[str, int] = {}
    texts: list[str] = []
    topics: list[str | None] = []
    for info in storage.expand(list(paths), options, config_field="ppl"):
        for kind, row in iter_shard(info.uri, options, CleanConfig(max_chars=10**9)):
            if kind != "doc":
                skipped[row["reason"]] = skipped.get(row["reason"], 0) + 1
                continue
            found = _topic(row["meta"])
            if topic is not None and found != topic:
                skipped["other_topic"] = skipped.get("other_topic", 0) + 1
            elif max_docs is None or len(texts) < max_docs:
                texts.append(row["text"])
                topics.append(found)
            else:
                skipped["over_max_docs"] = skipped.get("over_max_docs", 0) + 1
    if not texts:
        raise ConfigError("ppl", list(paths), f"no usable documents there (topic={topic!r}); skipped: {skipped}")
    return texts, topics, skipped
