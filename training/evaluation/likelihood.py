"""Log-likelihood scoring of multiple-choice continuations, all choices of a question in one row.

A question's context and its four continuations are packed into one row,
`[context, choice A, choice B, choice C, choice D]`, with a 4-D attention mask in which each choice sees
the context and itself (causally) but no other choice, and position ids in which every choice starts
right after the context. The context is run once instead of four times, and many questions share one
forward, sorted by length so that little is padded. The LM head runs only at the positions whose next
token is scored, not over the whole row (its 49,152-way product is about a fifth of SmolLM2's forward).

The packed scores equal those of four separate forwards (tested); `score_naive` is that plain path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.batching import length_batches
from core.progress import Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedItem:
    """One question's tokens: the (possibly left-truncated) context and each choice's continuation."""

    context: list[int]
    choices: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(choice) for choice in self.choices)


@dataclass
class ChoiceScores:
    """Per question and choice: summed log-likelihood, and the tokens and characters it covers."""

    logprob: np.ndarray
    """(questions, choices) summed log-probability of the continuation, in nats."""
    n_tokens: np.ndarray
    """(questions, choices) tokens in each continuation."""
    n_chars: np.ndarray
    """(questions, choices) characters in each continuation (with its leading space)."""

    def predictions(self, norm: str) -> np.ndarray:
        """(questions,) chosen index. norm: `sum` (summed log-likelihood), `char` (per character, the
        lm-evaluation-harness `acc_norm`) or `token` (per token)."""
        if norm == "sum":
            return self.logprob.argmax(axis=1)
        if norm == "char":
            return (self.logprob / self.n_chars).argmax(axis=1)
        if norm == "token":
            return (self.logprob / self.n_tokens).argmax(axis=1)
        raise ValueError(f"norm={norm!r}: use sum, char or token")


def encode_item(tokenizer, context: str, continuations: Sequence[str], max_length: int) -> PackedItem:
    """Tokenize a context and its continuations separately (so no token spans the boundary), cutting the
    context from the left so that the context plus the longest continuation fit in `max_length`."""
    context_ids = tokenizer(context)["input_ids"]
    choice_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
    if any(not ids for ids in choice_ids):
        raise ValueError(f"a continuation tokenizes to nothing: {list(continuations)!r}")
    room = max_length - max(len(ids) for ids in choice_ids)
    if room < 1:
        raise ValueError(f"a continuation alone is longer than max_length={max_length}")
    return PackedItem(context_ids[-room:], choice_ids)


def pack_batch(items: Sequence[PackedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of packed items -> model inputs and the gather indices of every scored token.

    Returns input_ids and position_ids (batch, length), attention_mask (batch, 1, length, length) bool,
    and, per scored token (flattened over the batch): `row`, `source` (the position whose logits
    predict it), `target` (its id) and `choice` (the flat index item * n_choices + choice).
    """
    longest = max(item.length for item in items)
    n_choices = len(items[0].choices)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(items), longest), dtype=torch.long)
    segment = torch.full((len(items), longest), -1, dtype=torch.long)  # 0 context, 1.. choices, -1 padding
    rows, sources, targets, choice_index = [], [], [], []
    for row, item in enumerate(items):
        n_context = len(item.context)
        input_ids[row, :n_context] = torch.as_tensor(item.context)
        position_ids[row, :n_context] = torch.arange(n_context)
        segment[row, :n_context] = 0
        start = n_context
        for choice, tokens in enumerate(item.choices):
            span = slice(start, start + len(tokens))
            input_ids[row, span] = torch.as_tensor(tokens)
            position_ids[row, span] = torch.arange(n_context, n_context + len(tokens))
            segment[row, span] = choice + 1
            # The first token is predicted from the context's last position, the others from the token
            # before them in the same choice.
            sources.extend([n_context - 1, *range(start, start + len(tokens) - 1)])
            targets.extend(tokens)
            rows.extend([row] * len(tokens))
            choice_index.extend([row * n_choices + choice] * len(tokens))
            start += len(tokens)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    # (batch, query, key): a query sees the context and its own segment, causally; padding sees itself.
    same_or_context = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    mask = causal[None] & same_or_context & (segment[:, :, None] >= 0)
    mask |= torch.eye(longest, dtype=torch.bool)[None] & (segment[:, :, None] < 0)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "row": torch.as_tensor(rows),
        "source": torch.as_tensor(sources),
        "target": torch.as_tensor(targets),
        "choice": torch.as_tensor(choice_index),
    }


def layer_masks(config: Any, mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, device: Any) -> Any:
    """A packed row's 4-D mask as each kind of attention layer must see it. A custom mask replaces the one the
    model would build, so what it would have added is added here:

    - a sliding-window layer sees only keys fewer than `sliding_window` positions back (by position id, which
      every choice restarts at the context's end), as in a plain forward of context plus choice. Models that
      mix layer kinds (`layer_types`: Qwen2/3, Gemma 2/3) take a mask per kind; Mistral and Phi-3 window
      every layer;
    - eager attention (Gemma 2's, for its logit softcapping) adds the mask to the scores: it gets 0 where a
      key is seen and the dtype's minimum where it is not, not booleans.
    """
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    masks = {"full_attention": mask}
    if window and (not kinds or "sliding_attention" in kinds):
        distance = position_ids[:, :, None] - position_ids[:, None, :]  # (batch, query, key)
        masks["sliding_attention"] = mask & (distance < window)[:, None]
    if getattr(config, "_attn_implementation", None) == "eager":
        masks = {kind: torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)
                 for kind, m in masks.items()}  # fmt: skip
    masks = {kind: m.to(device) for kind, m in masks.items()}
    if not kinds:
        return masks.get("sliding_attention", masks["full_attention"])
    return {kind: masks.get(kind, masks["full_attention"]) for kind in kinds}


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, d_model) final hidden states and (n,) next-token ids -> (n,) log-probabilities, in float32.

    The LM head runs here, not in the model's forward, so what that forward does after the head is done here
    too: Gemma 2 and 3 cap their logits (`final_logit_softcapping`, tanh(x / cap) * cap)."""
    logits = model.get_output_embeddings()(hidden).float()  # (n, vocab)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]


@torch.inference_mode()
def score_packed_batch(model: nn.Module, items: Sequence[PackedItem], pad_id: int) -> np.ndarray:
    """(items, choices) summed log-likelihood of every continuation, in one forward."""
    batch = pack_batch(items, pad_id)
    device = next(model.parameters()).device
    output = model.get_decoder()(
        input_ids=batch["input_ids"].to(device),
        attention_mask=layer_masks(
            model.config, batch["attention_mask"], batch["position_ids"], next(model.parameters()).dtype, device
        ),
        position_ids=batch["position_ids"].to(device),
        use_cache=False,
    )
    hidden = output.last_hidden_state[batch["row"].to(device), batch["source"].to(device)]  # (scored, d_model)
    logprobs = token_logprobs(model, hidden, batch["target"].to(device)).cpu().double()
    n_choices = len(items[0].choices)
    sums = torch.zeros(len(items) * n_choices, dtype=torch.float64).index_add_(0, batch["choice"], logprobs)
    return sums.view(len(items), n_choices).numpy()


def score_items(
    model: nn.Module,
    items: Sequence[PackedItem],
    pad_id: int,
    max_batch_tokens: int = 4096,
    max_batch_size: int = 32,
    label: str = "mmlu",
) -> np.ndarray:
    """(items, choices) summed log-likelihoods; items are batched by length (see `length_batches`).

    Progress lines (questions scored of all, rate, ETA) start with `label`."""
    if not items:
        return np.zeros((0, 4))
    n_choices = len(items[0].choices)
    if any(len(item.choices) != n_choices for item in items):
        raise ValueError("every item must have the same number of choices")
    scores = np.zeros((len(items), n_choices))
    lengths = [item.length for item in items]
    batches = length_batches(lengths, max(max_batch_tokens, max(lengths)), max_batch_size)
    with Progress(label, len(items), "questions") as progress:
        for indices in batches:
            scores[indices] = score_packed_batch(model, [items[i] for i in indices], pad_id)
            progress.add(len(indices))
    return scores


@torch.inference_mode()
def score_naive(model: nn.Module, items: Sequence[PackedItem]) -> np.ndarray:
    """The plain path: one forward of the whole model per (question, choice), batch size 1."""
    device = next(model.parameters()).device
    scores = np.zeros((len(items), len(items[0].choices)) if items else (0, 4))
    for index, item in enumerate(items):
        for choice, tokens in enumerate(item.choices):
            ids = torch.as_tensor([item.context + tokens], device=device)
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(dim=-1)  # (tokens, vocab)
            positions = torch.arange(len(item.context) - 1, ids.shape[1] - 1, device=device)
            scores[index, choice] = logprobs[positions, ids[0, positions + 1]].double().sum().item()
    return scores
