"""Choosing the K coordinates of a layer's activation that the SAE reads.

FineScope, following arXiv 2505.00624, feeds the SAE the K coordinates of layer L that are most
sensitive to the input: the rows of the Jacobian d h_L / d x with the largest norms, measured on the
seeds. The coordinates are fixed per SAE (stored in its cfg.json) so vectors stay aligned across
documents. `magnitude` (largest mean |h|) and `all` are offered for comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch

from core.batching import pad_right
from core.errors import ConfigError
from curation.encode import DocumentEncoder

logger = logging.getLogger(__name__)

CoordSelector = Literal["jacobian", "magnitude", "all"]


@torch.no_grad()
def jacobian_row_norms(
    encoder: DocumentEncoder,
    token_lists: Sequence[Sequence[int]],
    probes: int = 8,
    rel_eps: float = 1e-2,
    seed: int = 0,
) -> torch.Tensor:
    """(d_model,) estimate of the mean squared Jacobian row norm of each coordinate of layer L.

    ||J_i||^2 = d E_v[(J v)_i^2] for v uniform on each token's unit sphere (a Hutchinson-style estimator;
    the constant d does not change the ranking and is left out); J v is taken by a central
    finite difference of the truncated forward along v in input-embedding space, so one probe costs
    two batched forwards and no backward pass. Padding and the skipped leading positions are left out.
    The probe directions come from a CPU generator seeded with ``seed``, so the estimate (and the ranking
    built on it) is the same from run to run and on every device.
    """
    if not any(token_lists):
        raise ConfigError("seeds", len(token_lists), "need at least one non-empty text to measure a Jacobian")
    base = encoder.forward.base
    embed = base.get_input_embeddings()
    total = torch.zeros(base.config.hidden_size)
    count = 0
    generator = torch.Generator().manual_seed(seed)
    for rows, _, mask in encoder.hidden_batches(token_lists):
        ids, attention = pad_right([token_lists[row] for row in rows], encoder.pad_id)
        embeds = embed(ids.to(encoder.device)).float()
        attention = attention.to(embeds.device)
        # One step size per batch, relative to the typical embedding norm, keeps the difference
        # well above float32 rounding and well inside the linear regime.
        eps = rel_eps * embeds.norm(dim=-1)[attention.bool()].mean()
        for _ in range(probes):
            direction = torch.randn(embeds.shape, generator=generator).to(embeds.device)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            plus = base(inputs_embeds=embeds + eps * direction, attention_mask=attention, use_cache=False)
            minus = base(inputs_embeds=embeds - eps * direction, attention_mask=attention, use_cache=False)
            jvp = (plus.last_hidden_state - minus.last_hidden_state)[mask] / (2 * eps)  # (tokens, d_model)
            total += jvp.pow(2).sum(dim=0).float().cpu()
            count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def mean_magnitude(encoder: DocumentEncoder, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """(d_model,) mean |h_i| over the counted tokens."""
    total: torch.Tensor | None = None
    count = 0
    for _, hidden, mask in encoder.hidden_batches(token_lists):
        part = hidden[mask].abs().sum(dim=0)
        total = part if total is None else total + part
        count += int(mask.sum())
    if total is None:
        raise ConfigError("seeds", len(token_lists), "need at least one non-empty text to measure magnitudes")
    return total / max(count, 1)


def unmeasured_coords(selector: CoordSelector, hidden_size: int) -> list[int] | None:
    """The coordinates a selector chooses without measuring anything (every one, for `all`); None when
    they must be measured on a model."""
    return list(range(hidden_size)) if selector == "all" else None


def select_coords(
    encoder: DocumentEncoder,
    token_lists: Sequence[Sequence[int]],
    selector: CoordSelector,
    num_coords: int,
    seed: int = 0,
) -> list[int]:
    """The sorted coordinates the SAE will read. The encoder must read all coordinates (coords=None).

    ``seed`` draws the Jacobian probes; ``magnitude`` and ``all`` draw nothing.
    """
    d_model = encoder.forward.base.config.hidden_size
    if (fixed := unmeasured_coords(selector, d_model)) is not None:
        return fixed
    if not 1 <= num_coords <= d_model:
        raise ConfigError("num_coords", num_coords, f"must be in 1..{d_model} (the model's hidden size)")
    if selector == "jacobian":
        scores = jacobian_row_norms(encoder, token_lists, seed=seed)
    else:
        scores = mean_magnitude(encoder, token_lists)
    chosen = torch.topk(scores, num_coords).indices.sort().values.tolist()
    logger.info("selected %d of %d coordinates by %s", num_coords, d_model, selector)
    return chosen
