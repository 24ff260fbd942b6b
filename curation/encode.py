"""Documents to SAE-space vectors: truncated forward, input coordinates, Top-K SAE, pooling.

The core works on token-id lists and tensors and needs no Ray; `EncodeDocuments` and
`TokenActivations` are the thin actor adapters that Ray Data's `map_batches` runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from core.batching import length_batches, pad_right
from core.heap import release_free_heap
from core.logs import worker_logging
from core.models import TruncatedForward, load_model, load_tokenizer
from core.placement import resolve_device, resolve_dtype
from core.progress import bump
from core.storage import StorageOptions
from curation.explain import domain_drivers, explain_columns
from curation.sae.model import TopKSAE

# How a document's per-token SAE codes become one vector. `rate` counts how often each latent fires
# and ignores how strongly: a few high-magnitude latents dominate the mean code of every document
# whatever its topic, while which features fire, and how often, is what separates topics
# (docs/results.md, "Curation quality": on the demo corpus `rate` beat both `mean` and the dense baseline).
Pooling = Literal["rate", "mean"]

logger = logging.getLogger(__name__)


def pooling_mask(attention_mask: torch.Tensor, skip_positions: int) -> torch.Tensor:
    """(batch, tokens) mask of the positions that count: not padding, and not the first `skip_positions`.

    Position 0 of SmolLM2 carries an attention-sink activation 6x to 140x larger than the rest
    (docs/design.md, "Position 0: the attention sink"); pooling it in makes a document's vector
    measure its length, not its content.
    A document shorter than `skip_positions + 1` tokens keeps its last token so it is never empty.
    """
    mask = attention_mask.bool().clone()
    mask[:, :skip_positions] = False
    lengths = attention_mask.sum(dim=1)
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = torch.nonzero(empty).squeeze(1)
        mask[rows, (lengths[rows] - 1).clamp(min=0)] = True
    return mask


def mean_pool(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, dim) values, (batch, tokens) mask -> (batch, dim) mean over masked-in tokens."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def firing_rate(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, latents) sparse codes -> (batch, latents) share of counted tokens each latent fires on."""
    return mean_pool((codes > 0).to(codes.dtype), mask)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def cosine_scores(doc_vectors: torch.Tensor, seed_vectors: torch.Tensor) -> torch.Tensor:
    """(docs, dim) and (seeds, dim), both unit-norm -> (docs, seeds) cosine similarities."""
    return doc_vectors @ seed_vectors.T


def weighted_unit(pooled: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(docs, dim) pooled codes -> unit document vectors, each latent scaled by `weights` first (None: alike).

    The encoder and the re-selection from stored codes (curation/selection/reselect.py) both make vectors
    here, so the same pooled code gives the same vector in both."""
    return l2_normalize(pooled * weights if weights is not None else pooled)


CODE_COLUMNS = ("code_latents", "code_values")
"""The scored columns that keep each document's pooled code, sparse: its nonzero latents (ascending) and their
pooled values, before the rarity weighting. Dense vectors of every latent would cost 4 bytes a latent."""


def sparse_codes(pooled: torch.Tensor) -> dict[str, pa.Array]:
    """(docs, latents) pooled codes -> `code_latents` list<int32> and `code_values` list<float32>, exact."""
    pooled = pooled.detach().to("cpu", torch.float32)
    rows, latents = torch.nonzero(pooled, as_tuple=True)
    offsets = np.zeros(pooled.shape[0] + 1, dtype=np.int32)
    np.cumsum(torch.bincount(rows, minlength=pooled.shape[0]).numpy(), out=offsets[1:])
    offsets_array = pa.array(offsets, pa.int32())
    return {
        "code_latents": pa.ListArray.from_arrays(offsets_array, pa.array(latents.numpy().astype(np.int32))),
        "code_values": pa.ListArray.from_arrays(offsets_array, pa.array(pooled[rows, latents].numpy())),
    }


def dense_codes(latents: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray, width: int) -> torch.Tensor:
    """`sparse_codes`' two columns -> the (docs, width) float32 pooled codes they were made from."""
    latents, values = (column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
                       for column in (latents, values))  # fmt: skip
    counts = np.diff(latents.offsets.to_numpy()) if len(latents) else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(latents)), counts)
    out = torch.zeros((len(latents), width), dtype=torch.float32)
    flat_latents = latents.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(flat_latents) and (flat_latents.min() < 0 or flat_latents.max() >= width):
        raise ValueError(f"stored codes name latents outside 0..{width - 1}: they belong to another SAE")
    flat_values = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    out[torch.from_numpy(rows), torch.from_numpy(flat_latents)] = torch.from_numpy(flat_values)
    return out


class Encoded(NamedTuple):
    """What `DocumentEncoder.encode_codes` returns for a list of documents, in input order."""

    vectors: torch.Tensor
    """(docs, dim) unit document vectors."""
    pooled: torch.Tensor
    """(docs, dim) the pooled codes the vectors were made from, before the latent weights."""
    peaks: torch.Tensor
    """(docs, watched) each watched latent's largest code over the document's counted tokens."""
    positions: torch.Tensor
    """(docs, watched) the token position of that peak (the first on ties)."""


@dataclass
class EncoderSettings:
    """Everything an encoder actor needs to build itself; small and picklable."""

    model: str
    sae_dir: str | None
    layer: int
    coords: list[int] | None = None
    skip_positions: int = 1
    pooling: Pooling = "rate"
    max_batch_tokens: int = 8192
    """Padded tokens per forward micro-batch."""
    max_batch_rows: int = 64
    """Documents per forward micro-batch at most. A GPU wants far larger micro-batches than a CPU does:
    docs/cluster.md, "Encoding on GPUs"."""
    device: str = "cpu"
    """cpu, cuda, or `accelerator`: the GPU Ray gives the actor (core.placement.resolve_device)."""
    dtype: str = "float32"
    """The truncated forward's matmuls: float32, bfloat16, or auto (bfloat16 where the worker's device
    computes it natively: core.placement.resolve_dtype). bfloat16 keeps the weights in float32 and runs the
    forward under bf16 autocast, on a CPU and on a GPU alike, so only the matmuls round (and short documents
    stay in float32: `bf16_min_tokens`), and both devices select the same documents. The output is cast to
    float32 before the coordinates, the SAE and pooling, which stay in float32."""
    bf16_min_tokens: int = 32
    """With bfloat16, a micro-batch whose shortest document has fewer tokens runs in float32.
    A short document's vector is the share of a few tokens each latent fires on, so one token's Top-K swap
    under bf16 rounding moves it most; these documents are about 0.5% of a corpus's tokens
    (docs/results.md, "bfloat16 encode")."""
    threads: int = 0
    latent_weights: list[float] | None = None
    """Per SAE latent, a weight applied to the pooled vector before it is normalised: the rarity weights of
    curation/latent_weights.py. None weighs every latent alike."""
    storage_options: StorageOptions | None = None
    """Reach a model on S3 (the job's endpoint and region; credentials stay in each process's environment)."""


class DocumentEncoder:
    """A truncated model plus (optionally) an SAE, loaded once, turning token lists into vectors."""

    def __init__(self, spec: EncoderSettings, sae: TopKSAE | None = None):
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.tokenizer = load_tokenizer(spec.model, spec.storage_options)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        # bf16 weights would also round the residual stream after every block. Autocast keeps the weights,
        # norms and residual in fp32 and runs only the matmuls in bf16: closer to fp32 than bf16 weights on
        # either device, and no slower (docs/results.md, "bfloat16 encode"). The truncated forward's fp32
        # weights take twice bf16's memory: 340 MB for SmolLM2-135M at layer 15.
        self.autocast = self.dtype == "bfloat16"
        model = load_model(spec.model, dtype=torch.float32, device=self.device, options=spec.storage_options)
        self.forward = TruncatedForward(model, spec.layer)
        if sae is None and spec.sae_dir is not None:
            sae = TopKSAE.load(spec.sae_dir, device=self.device)
        # A passed-in SAE was built or loaded elsewhere (on the driver's CPU, say): everything that meets
        # the activations must sit on this encoder's one device.
        self.sae = sae.to(self.device).eval() if sae is not None else None
        coords = spec.coords if spec.coords is not None else (sae.cfg.coords if sae is not None else None)
        self.coords = torch.as_tensor(coords, dtype=torch.long) if coords else None
        self.weights = None
        if spec.latent_weights is not None and self.sae is not None:
            if len(spec.latent_weights) != self.sae.cfg.num_latents:
                raise ValueError(f"{len(spec.latent_weights)} latent weights for {self.sae.cfg.num_latents} latents")
            self.weights = torch.tensor(spec.latent_weights, dtype=torch.float32, device=self.device)

    def matmul_precision(self, shortest: int) -> AbstractContextManager:
        """The context a micro-batch's truncated forward runs in, given its shortest document's length: bf16
        autocast in bfloat16, unless that document is under `spec.bf16_min_tokens`."""
        enabled = self.autocast and shortest >= self.spec.bf16_min_tokens
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=enabled)

    def hidden_batches(
        self, token_lists: Sequence[Sequence[int]]
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Yield (row indices, (b, t, d) layer activations at the chosen coordinates, (b, t) pooling mask).

        The mask leaves out padding, the first `skip_positions` and, with an SAE, tokens over its
        `max_input_norm` (attention sinks at later positions) unless nothing else is left."""
        lengths = [len(tokens) for tokens in token_lists]
        for rows in length_batches(lengths, self.spec.max_batch_tokens, self.spec.max_batch_rows):
            ids, attention = pad_right([token_lists[row] for row in rows], self.pad_id)
            with self.matmul_precision(min(lengths[row] for row in rows)):
                hidden = self.forward(ids.to(self.device), attention.to(self.device)).float()
            if self.coords is not None:
                hidden = hidden[..., self.coords.to(hidden.device)]
            mask = pooling_mask(attention, self.spec.skip_positions).to(hidden.device)
            if self.sae is not None:
                # Attention sinks past skip_positions pool nothing, unless they are all a document has.
                kept = mask & self.sae.keep(hidden)
                mask = torch.where(kept.any(dim=1, keepdim=True), kept, mask)
            yield rows, hidden, mask

    @torch.inference_mode()
    def encode(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token lists -> (docs, dim) unit-norm document vectors, in input order.

        With an SAE, dim is its number of latents, pooled over the document's counted tokens by
        `spec.pooling`: `rate`, the share of tokens each latent fires on, or `mean`, the mean code; then
        scaled by `spec.latent_weights` when given.
        Without one, the mean of the layer activations themselves (the dense baseline).
        """
        return self.encode_with_peaks(token_lists)[0]

    @torch.inference_mode()
    def encode_with_peaks(
        self, token_lists: Sequence[Sequence[int]], watch: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token lists -> (vectors, peaks, positions): `encode`'s vectors, and for each of the `watch` latents
        (indices into dim) its largest code over each document's counted tokens, (docs, watched), and the
        token position where it is (the first on ties), (docs, watched) long. Costs one gather per batch.
        """
        encoded = self.encode_codes(token_lists, watch)
        return encoded.vectors, encoded.peaks, encoded.positions

    @torch.inference_mode()
    def encode_codes(self, token_lists: Sequence[Sequence[int]], watch: torch.Tensor | None = None) -> Encoded:
        """Token lists -> `Encoded`: the vectors, the pooled codes before the latent weights, and the peaks and
        positions of the `watch` latents (see `encode_with_peaks`)."""
        watched = 0 if watch is None else len(watch)
        vectors: torch.Tensor | None = None
        pooled_all: torch.Tensor | None = None
        peaks = torch.zeros((len(token_lists), watched))
        positions = torch.zeros((len(token_lists), watched), dtype=torch.long)
        for rows, hidden, mask in self.hidden_batches(token_lists):
            codes = hidden if self.sae is None else self.sae.encode_dense(hidden)
            if self.sae is not None and self.spec.pooling == "rate":
                pooled = firing_rate(codes, mask)
            else:
                pooled = mean_pool(codes, mask)
            if vectors is None or pooled_all is None:
                vectors = torch.zeros((len(token_lists), pooled.shape[-1]))
                pooled_all = torch.zeros((len(token_lists), pooled.shape[-1]))
            vectors[rows] = weighted_unit(pooled, self.weights).cpu()
            pooled_all[rows] = pooled.cpu()
            if watched:
                values = codes[..., watch.to(codes.device)].masked_fill(~mask.unsqueeze(-1), -torch.inf)
                top, where = values.max(dim=1)
                peaks[rows], positions[rows] = top.cpu(), where.cpu()
        empty = torch.zeros((0, 0))
        return Encoded(vectors if vectors is not None else empty, pooled_all if pooled_all is not None else empty,
                       peaks, positions)  # fmt: skip

    @torch.inference_mode()
    def activations(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token lists -> (tokens, d_in) activations of every counted token, for SAE training."""
        # Not pooling_mask alone: its fallback keeps a 1-token document's position 0, and that
        # attention-sink activation must never reach SAE training or the normaliser.
        skip = self.spec.skip_positions
        chunks = [hidden[:, skip:][mask[:, skip:]] for _, hidden, mask in self.hidden_batches(token_lists)]
        return torch.cat(chunks).cpu() if chunks else torch.zeros((0, 0))


class EncodeDocuments:
    """Ray Data actor: token ids -> cosine similarity of each document to every seed.

    The output drops `input_ids` and adds `seed_sims` (float32 per seed) and the document's pooled code,
    sparse (`CODE_COLUMNS`), so that another rule, size, weighting or set of seeds can be applied later
    without encoding the corpus again (curation/selection/reselect.py). Given the seeds' domains, it also
    adds the small explanation columns of curation/explain.py (`domain_latents`, `domain_contributions`,
    `driver_peaks`, `driver_positions`): why each document scores as it does, computed here because only
    here do the document vectors and token-level codes exist.
    """

    def __init__(
        self,
        spec: EncoderSettings,
        seed_vectors: np.ndarray,
        sae: TopKSAE | None = None,
        progress: Any = None,
        seed_domains: list[str] | None = None,
    ):
        worker_logging()
        self.progress = progress  # a core.progress.ray_counter, bumped once per batch
        self.encoder = DocumentEncoder(spec, sae=sae)
        self.seed_vectors = torch.tensor(seed_vectors, dtype=torch.float32)
        self.drivers = domain_drivers(seed_vectors, seed_domains) if seed_domains else None
        self.tokens = 0
        self.seconds = 0.0
        logger.info("encoder ready on pid %d (layer %d)", os.getpid(), spec.layer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        started = time.perf_counter()
        token_lists = [row.tolist() for row in batch.pop("input_ids")]
        watch = torch.as_tensor(self.drivers.latents.reshape(-1)) if self.drivers is not None else None
        vectors, pooled, peaks, positions = self.encoder.encode_codes(token_lists, watch)
        sims = cosine_scores(vectors, self.seed_vectors).numpy().astype(np.float32)
        batch["seed_sims"] = sims
        if self.encoder.sae is not None:
            batch.update(sparse_codes(pooled))
        if self.drivers is not None:
            batch.update(explain_columns(vectors, self.seed_vectors, sims, peaks, positions, self.drivers))
        self.tokens += int(batch["n_tokens"].sum())
        self.seconds += time.perf_counter() - started
        logger.debug("encoded %d docs, %.0f tokens/s so far", len(token_lists), self.tokens / self.seconds)
        bump(self.progress, len(token_lists))
        release_free_heap()
        return batch


class TokenActivations:
    """Ray Data actor: token ids -> one row per counted token, `act` of shape (d_in,), for SAE training."""

    def __init__(self, spec: EncoderSettings):
        worker_logging()
        self.encoder = DocumentEncoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        token_lists = [row.tolist() for row in batch["input_ids"]]
        activations = self.encoder.activations(token_lists).numpy().astype(np.float32)
        release_free_heap()
        return {"act": activations}
