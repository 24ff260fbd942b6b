"""Importance of every attention group and MLP channel: first-order Taylor, magnitude, or random; and what
removing each attention group alone costs.

Taylor (Molchanov et al. 2019; LLM-Pruner's element-wise first-order term, Ma et al. 2023): for each batch
of domain text, the causal-LM loss is back-propagated and every weight contributes |w * dL/dw| (so does the
bias of a cut row, in the families that have one); the contributions are summed over the weights of a
structure and accumulated over batches. Which weights make up a structure comes from the model family's
description in structures.py, fused projections included.

Memory. Only the per-structure sums are kept: (layers, groups) and (layers, channels) floats, 46,170
numbers for SmolLM2. No gradient outlives its own parameter's backward step: a post-accumulate-grad hook
on each weight folds |w * grad| into those sums and frees the gradient at once, so during backward at
most one weight matrix's gradient exists (the largest in SmolLM2 is 3.5 MB; in Llama-3.1-8B, a
14,336 x 4,096 MLP matrix, 117 MB in bf16). Embeddings, norms and the LM head are frozen and never get a
gradient. Peak memory is therefore the weights plus the activations of one batch:

- SmolLM2-135M in fp32, batches of 8 x 256 tokens: 2.4 GB RSS for the whole process during the
  importance pass (measured, see docs/results.md), of which the fp32 weights are 0.54 GB and the 49,152-way logits
  of one batch with their gradient 0.8 GB.
- Llama-3.1-8B in bf16: 16 GB of weights + one matrix's gradient + activations. With activation
  checkpointing (`checkpointing=True`) the activations are one layer's inputs per layer plus one
  layer's recomputed internals plus the logits and their gradient: about 3 GB at batch 4 x 512, most of
  it the 128k-vocabulary logits. About 20 GB in all: it fits a 24 GB GPU.

Removal loss (`removal_losses`). A first-order score misses a structure whose loss is flat to first order
but not to its removal: SmolLM2-135M's layer 1 has a KV group whose Taylor score, on general text, is the
lowest of its layer, and removing it alone takes the model's perplexity from 19.5 to 479.5
(docs/replication.md, "The pilot"). Attention groups are few (SmolLM2: 30 layers x 3), so each is removed
alone, by zeroing its query heads' input columns of the output projection (what slicing it computes, see
structures.py), and the mean causal-LM loss on a few batches is measured against the whole model's: one
forward per group and batch, no backward.

LLM-Pruner's `param_mix` keeps, for every parameter, its full gradient and an fp32 accumulator of
gradients across batches (for its second-order term), i.e. weights (16 GB) + gradients (16 GB) + fp32
accumulators (32 GB) for an 8B model, which is why it runs out of memory on a 40 GB GPU.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from training.pruning.structures import CHANNEL, QUERY, Layout, decoder_layers, module_at, structure_sums

logger = logging.getLogger(__name__)


@dataclass
class Importance:
    """Per-structure scores: `groups` is (layers, kv_heads), `channels` is (layers, intermediate_size)."""

    groups: torch.Tensor
    channels: torch.Tensor
    batches: int = 0
    tokens: int = 0
    removal: torch.Tensor | None = None
    """(layers, kv_heads): the mean loss increase per token when the group alone is removed, where measured."""

    def to_npz(self) -> bytes:
        """The raw scores as a NumPy .npz (arrays `groups`, `channels`, and `removal` where measured)."""
        buffer = io.BytesIO()
        arrays = {"groups": self.groups.numpy(), "channels": self.channels.numpy()}
        if self.removal is not None:
            arrays["removal"] = self.removal.numpy()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> Importance:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        removal = torch.from_numpy(arrays["removal"]) if "removal" in arrays else None
        return cls(torch.from_numpy(arrays["groups"]), torch.from_numpy(arrays["channels"]), removal=removal)

    def summary(self) -> dict:
        return {
            "batches": self.batches,
            "tokens": self.tokens,
            "attention_total": float(self.groups.sum()),
            "mlp_total": float(self.channels.sum()),
            "per_layer_attention": [round(float(x), 6) for x in self.groups.sum(1)],
            "per_layer_mlp": [round(float(x), 6) for x in self.channels.sum(1)],
        }


def _zeros(layout: Layout) -> Importance:
    return Importance(
        groups=torch.zeros(layout.num_layers, layout.num_kv_heads, dtype=torch.float64),
        channels=torch.zeros(layout.num_layers, layout.intermediate_size, dtype=torch.float64),
    )


def _structure_reducers(model: nn.Module, layout: Layout, into: Importance) -> list[tuple[nn.Parameter, Callable]]:
    """For every sliced weight and bias, a function that adds its element-wise scores into `into`.

    A weight's scores are summed over the axis that is not cut (a row's or a column's total), a bias's are
    taken as they are; either way one number per row of the cut axis, which the family's description splits
    into its blocks and sums per structure.
    """
    reducers = []
    for index, layer in enumerate(decoder_layers(model)):
        for projection in layout.family.projections:
            linear = module_at(layer, projection.path)
            add = partial(_add_rows, into, layout, projection.parts, index)
            reducers.append((linear.weight, partial(_add_weight, add, 1 - projection.axis)))
            if projection.axis == 0 and linear.bias is not None:
                reducers.append((linear.bias, add))
    return reducers


def _add_weight(add: Callable, kept_axis: int, score: torch.Tensor) -> None:
    add(score.sum(kept_axis))


def _add_rows(into: Importance, layout: Layout, parts: tuple[str, ...], layer: int, rows: torch.Tensor) -> None:
    for part, sums in structure_sums(layout, parts, rows):
        target = into.channels if part == CHANNEL else into.groups
        target[layer] += sums.double().cpu()


def magnitude_importance(model: nn.Module, layout: Layout) -> Importance:
    """Sum of |w| over each structure's weights (and cut biases): no data, the classic baseline."""
    scores = _zeros(layout)
    with torch.no_grad():
        for weight, add in _structure_reducers(model, layout, scores):
            add(weight.detach().abs().float())
    return scores


def random_importance(layout: Layout, seed: int = 0) -> Importance:
    """Random scores per structure: the floor any informed method must beat.

    Each score is uniform in [0, 1) times the structure's weight count, so that in expectation every
    weight is worth the same whether it sits in attention or in the MLP, and the split between the two
    is not biased (unscaled scores would make a 294,912-weight attention group as cheap to remove as a
    1,728-weight channel, and the planner would strip attention first).
    """
    generator = torch.Generator().manual_seed(seed)
    scores = _zeros(layout)
    scores.groups = torch.rand(scores.groups.shape, generator=generator, dtype=torch.float64) * layout.group_params
    scores.channels = torch.rand(scores.channels.shape, generator=generator, dtype=torch.float64)
    scores.channels *= layout.channel_params
    return scores


def _train_without_dropout(model: nn.Module) -> None:
    """Train mode for the decoder layers, which transformers checkpoints only in train mode, with every dropout
    (Phi-3's residual dropout, the attention's dropout rate) left off, so the scores do not depend on a draw."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout) or hasattr(module, "attention_dropout"):
            module.eval()


def taylor_importance(
    model: nn.Module,
    layout: Layout,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    checkpointing: bool = False,
) -> Importance:
    """Sum over batches and over each structure's weights (and cut biases) of |w * dL/dw|, L the causal-LM loss.

    `batches` yields (batch, tokens) input ids and attention masks; padded positions carry no loss.
    Gradients are folded into the per-structure sums by hooks during backward and freed at once.
    """
    scores = _zeros(layout)
    reducers = _structure_reducers(model, layout, scores)
    sliced = {id(weight) for weight, _ in reducers}
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in sliced)
    handles = []
    for weight, add in reducers:

        def fold(parameter: torch.Tensor, add=add) -> None:
            add((parameter.detach() * parameter.grad).abs_().float())
            parameter.grad = None  # freed now, not at the end of backward

        handles.append(weight.register_post_accumulate_grad_hook(fold))
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable()
        _train_without_dropout(model)
    started = time.perf_counter()
    try:
        for input_ids, attention_mask in batches:
            device = next(model.parameters()).device
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
            loss.backward()
            scores.batches += 1
            scores.tokens += int(attention_mask.sum())
            if scores.batches % 10 == 0:
                rate = scores.tokens / (time.perf_counter() - started)
                logger.info("importance: %d batches, %d tokens, %.0f tokens/s", scores.batches, scores.tokens, rate)
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(saved_flags[name])
            parameter.grad = None
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return scores


def removal_losses(
    model: nn.Module, layout: Layout, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """(layers, kv_heads): per attention group, the token-weighted mean causal-LM loss on `batches` with that
    group alone removed, minus the whole model's. The group's query heads are silenced by zeroing their input
    columns of the output projection, which is what slicing the group out computes."""
    output = next(p for p in layout.family.projections if p.axis == 1 and p.parts == (QUERY,))
    width = layout.heads_per_group * layout.head_dim
    layers = decoder_layers(model)
    silenced: list[tuple[int, int] | None] = [None]

    def silence(index: int, module: nn.Module, args: tuple) -> tuple | None:
        if silenced[0] is None or silenced[0][0] != index:
            return None
        group = silenced[0][1]
        hidden = args[0].clone()
        hidden[..., group * width : (group + 1) * width] = 0
        return (hidden, *args[1:])

    handles = [module_at(layer, output.path).register_forward_pre_hook(partial(silence, index))
               for index, layer in enumerate(layers)]  # fmt: skip
    losses = torch.zeros(layout.num_layers, layout.num_kv_heads, dtype=torch.float64)
    whole, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                device = next(model.parameters()).device
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                labels = input_ids.masked_fill(attention_mask == 0, -100)
                scored = int((labels[:, 1:] != -100).sum())

                silenced[0] = None
                whole += _summed_loss(model, input_ids, attention_mask, labels, scored)
                for index in range(layout.num_layers):
                    for group in range(layout.num_kv_heads):
                        silenced[0] = (index, group)
                        losses[index, group] += _summed_loss(model, input_ids, attention_mask, labels, scored)
                tokens += scored
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not tokens:
        raise ValueError("no scored tokens in the batches: removal losses need text")
    return (losses - whole) / tokens


def _summed_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, scored: int
) -> float:
    """The causal-LM loss summed over the batch's `scored` tokens (transformers returns their mean)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    return float(out.loss) * scored
