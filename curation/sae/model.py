"""Top-K sparse autoencoder over a layer's activations (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv 2406.04093).

The SAE turns an activation vector (the ``d_in`` coordinates of one token's hidden state chosen upstream)
into ``k`` active latents out of ``num_latents``. Curation pools those sparse codes over a document's
tokens. What is here:

- :class:`SAEConfig`: width, sparsity, AuxK and dead-latent settings, plus the identity of the layer and
  coordinates the SAE reads (stored in ``cfg.json`` so that vectors stay aligned across runs).
- :class:`TopKSAE`: the model. Fixed input normalisation, top-k encoder, unit-norm decoder, AuxK loss.
- :class:`SAETrainer`: one Adam step at a time, with dead-latent bookkeeping.
- :func:`train_sae`: fit the normaliser, train over an iterable of activation batches, log progress.

Pure torch: the Ray adapters that feed activations live elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.errors import ConfigError, check_range

logger = logging.getLogger(__name__)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


@dataclass
class SAEConfig:
    """Shape, sparsity and provenance of a Top-K SAE.

    ``num_latents`` and ``aux_k`` are resolved in ``__post_init__`` (0 means "derive"), so after
    construction they hold the real width and AuxK size, and ``cfg.json`` stores the resolved values.
    """

    d_in: int
    """Number of input coordinates: the K coordinates of the layer's activation chosen upstream."""
    num_latents: int = 0
    """Dictionary width. 0 means ``expansion_factor * d_in``."""
    expansion_factor: int = 16
    """Width multiplier used when ``num_latents`` is 0."""
    k: int = 32
    """Active latents per token (the Top-K)."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss. 0 means ``d_in // 2``, as in Gao et al. 2024, sec. A.2."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss in the total loss (Gao et al. 2024, sec. A.2)."""
    dead_after_tokens: int = 100_000
    """A latent that has not fired in this many training tokens counts as dead."""
    layer: int = -1
    """Provenance: index of the decoder layer whose output the SAE reads (-1 when unset)."""
    coords: list[int] = field(default_factory=list)
    """Provenance: indices into the layer's hidden vector, in input order; ``len == d_in`` when set."""
    coord_selector: str = "all"
    """Provenance: how ``coords`` were chosen (e.g. ``all``, ``jacobian``, ``magnitude``)."""
    base_model: dict = field(default_factory=dict)
    """Provenance: identity of the base model, e.g. name, hidden_size, num_layers, fingerprint."""
    skip_positions: int = 1
    """Leading token positions excluded from training and pooling (the attention-sink position 0)."""
    max_input_norm: float = 0.0
    """Tokens whose input norm exceeds this are attention sinks that escaped `skip_positions` (SmolLM2 makes
    one at position 1 of some documents, up to 200x the median norm): left out of training and of pooling.
    Set by `fit_normalizer` to SINK_FACTOR x the sample's median norm; 0 means no limit."""

    def __post_init__(self) -> None:
        check_range("d_in", self.d_in, ge=1, hint="the number of input coordinates")
        check_range("expansion_factor", self.expansion_factor, ge=1)
        check_range("num_latents", self.num_latents, ge=0, hint="0 derives it from d_in")
        if self.num_latents == 0:
            self.num_latents = self.expansion_factor * self.d_in
        check_range("k", self.k, ge=1)
        if self.k > self.num_latents:
            raise ConfigError(
                "k", self.k, f"must be <= num_latents={self.num_latents}; lower k or raise expansion_factor"
            )
        self._validate_aux()
        self._validate_provenance()

    def _validate_aux(self) -> None:
        check_range("aux_k", self.aux_k, ge=0, hint="0 means d_in // 2")
        if self.aux_k == 0:
            self.aux_k = min(max(1, self.d_in // 2), self.num_latents)
        if self.aux_k > self.num_latents:
            raise ConfigError(
                "aux_k", self.aux_k, f"must be <= num_latents={self.num_latents}; lower aux_k or set it to 0"
            )
        check_range("aux_coeff", self.aux_coeff, ge=0, hint="0 turns AuxK off")
        check_range("dead_after_tokens", self.dead_after_tokens, ge=1)

    def _validate_provenance(self) -> None:
        if len(self.coords) not in (0, self.d_in):
            raise ConfigError(
                "coords", f"<{len(self.coords)} indices>", f"must be empty or hold d_in={self.d_in} indices"
            )
        if any(c < 0 for c in self.coords) or len(set(self.coords)) != len(self.coords):
            raise ConfigError("coords", self.coords, "must be distinct non-negative indices")
        check_range("skip_positions", self.skip_positions, ge=0)
        check_range("layer", self.layer, ge=-1, hint="a 0-based decoder layer index, or -1 when unset")
        check_range("max_input_norm", self.max_input_norm, ge=0, hint="0: no limit")


SINK_FACTOR = 10.0
"""An input norm this many times the median is an attention sink: ordinary tokens stay within 2x of the
median, sinks sit at 20x to 200x (docs/design.md, "Position 0: the attention sink")."""


@dataclass
class SAEOutput:
    """What :meth:`TopKSAE.forward` returns for a batch of ``n`` rows."""

    x_hat: Tensor
    """Reconstruction in normalised space, (n, d_in)."""
    top_acts: Tensor
    """Values of the k active latents, (n, k)."""
    top_indices: Tensor
    """Indices of the k active latents, (n, k), long."""
    fvu: Tensor
    """Fraction of variance unexplained, scalar."""
    auxk_loss: Tensor
    """AuxK loss (normalised MSE of the residual fit by dead latents), scalar; 0 when nothing is dead."""


def _fraction_unexplained(target: Tensor, prediction: Tensor) -> Tensor:
    """sum ||target - prediction||^2 / sum ||target - mean(target)||^2 over rows; target (n, d) -> scalar."""
    total_variance = (target - target.mean(dim=0)).pow(2).sum()
    # A constant batch has no variance to explain; the clamp keeps the ratio finite instead of NaN.
    return (target - prediction).pow(2).sum() / total_variance.clamp_min(1e-12)


class TopKSAE(nn.Module):
    """Top-K sparse autoencoder with fixed input normalisation (Gao et al. 2024, sec. 2).

    ``x_norm = (x - input_mean) / input_scale``;
    ``z = TopK(relu(W_enc (x_norm - b_dec) + b_enc))``; ``x_hat = W_dec^T z + b_dec`` (normalised space).
    """

    input_mean: Tensor
    input_scale: Tensor

    def __init__(
        self,
        cfg: SAEConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        """``seed`` decides the initial weights alone: they are drawn on the CPU from a generator of their own,
        so the same seed gives the same SAE on every device, whatever the global torch generator's state."""
        super().__init__()
        self.cfg = cfg
        n, d = cfg.num_latents, cfg.d_in
        self.register_buffer("input_mean", torch.zeros(d, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=dtype))
        # Gao et al. 2024, sec. A.1: unit-norm decoder rows, encoder initialised as the decoder's transpose.
        # (W_enc is stored as (num_latents, d_in) like W_dec, so "transpose" means equal tensors here.)
        generator = torch.Generator().manual_seed(seed)
        decoder = torch.randn(n, d, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        decoder /= decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.clone())
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @torch.no_grad()
    def fit_normalizer(self, x: Tensor) -> None:
        """Fit ``input_mean`` and ``input_scale`` on a sample of raw activations ``x`` (n, d_in).

        One scalar scale for all coordinates and tokens, chosen so that E||x_norm||^2 == d_in: each
        coordinate is O(1), so the init, the learning-rate rule and the thresholds carry over between
        layers and models whose activations differ in magnitude by orders (Gao et al. 2024 likewise
        normalise inputs to a fixed scale). A single scale, unlike per-token unit norm, keeps the
        relative size of tokens, and unlike per-coordinate scaling it keeps the geometry the model uses.
        """
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in or x.shape[0] < 2:
            shape = tuple(x.shape)
            raise ValueError(f"fit_normalizer needs (n >= 2, d_in={self.cfg.d_in}) rows, got {shape}")
        sample = x.detach().to(device=self.device, dtype=torch.float64)
        # A handful of sink tokens would carry half the sample's squared norm and set the scale alone.
        norms = sample.norm(dim=1)
        self.cfg.max_input_norm = float(SINK_FACTOR * norms.median())
        sample = sample[norms <= self.cfg.max_input_norm]
        mean = sample.mean(dim=0)
        mean_sq_norm = (sample - mean).pow(2).sum(dim=1).mean()
        scale = (mean_sq_norm / self.cfg.d_in).sqrt().item()
        if not math.isfinite(scale) or scale < 1e-12:
            logger.warning("activations have no spread (scale=%s); using input_scale=1", scale)
            scale = 1.0
        self.input_mean.copy_(mean.to(self.input_mean.dtype))
        self.input_scale.fill_(scale)

    def keep(self, x: Tensor) -> Tensor:
        """Raw inputs (..., d_in) -> (...) bool: True for tokens within `max_input_norm` (every token when 0)."""
        if self.cfg.max_input_norm <= 0:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return x.float().norm(dim=-1) <= self.cfg.max_input_norm

    def normalize(self, x: Tensor) -> Tensor:
        """Raw activations (..., d_in) -> normalised (..., d_in), in the SAE's dtype and device."""
        x = x.to(device=self.device, dtype=self.W_dec.dtype)
        return (x - self.input_mean) / self.input_scale

    def _pre_acts(self, x_norm: Tensor) -> Tensor:
        """Normalised (..., d_in) -> relu(W_enc (x_norm - b_dec) + b_enc), (..., num_latents)."""
        return F.relu(F.linear(x_norm - self.b_dec, self.W_enc, self.b_enc))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x (..., d_in) -> (top_acts (..., k), top_indices (..., k) long).

        Values are >= 0; an entry is 0 only when fewer than k latents have a positive pre-activation.
        """
        top_acts, top_indices = self._pre_acts(self.normalize(x)).topk(self.cfg.k, dim=-1, sorted=False)
        return top_acts, top_indices

    def encode_dense(self, x: Tensor) -> Tensor:
        """Raw x (..., d_in) -> dense codes (..., num_latents) with at most k non-zeros per row."""
        top_acts, top_indices = self.encode(x)
        dense = top_acts.new_zeros(*top_acts.shape[:-1], self.cfg.num_latents)
        return dense.scatter_(-1, top_indices, top_acts)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """(top_acts, top_indices), both (..., k) -> reconstruction (..., d_in) in normalised space."""
        lead_shape = top_acts.shape[:-1]
        # embedding_bag sums the k selected decoder rows weighted by their activations without
        # materialising the dense (n, num_latents) code.
        x_hat = F.embedding_bag(
            top_indices.reshape(-1, top_indices.shape[-1]),
            self.W_dec,
            per_sample_weights=top_acts.reshape(-1, top_acts.shape[-1]),
            mode="sum",
        )
        return x_hat.reshape(*lead_shape, self.cfg.d_in) + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Raw x (n, d_in) -> :class:`SAEOutput`. ``dead_mask`` (num_latents,) bool turns on AuxK."""
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"expected x of shape (n, {self.cfg.d_in}), got {tuple(x.shape)}")
        x_norm = self.normalize(x)
        pre_acts = self._pre_acts(x_norm)
        top_acts, top_indices = pre_acts.topk(self.cfg.k, dim=-1, sorted=False)
        x_hat = self.decode(top_acts, top_indices)
        fvu = _fraction_unexplained(x_norm, x_hat)
        auxk_loss = self._auxk_loss(pre_acts, x_norm - x_hat.detach(), dead_mask)
        return SAEOutput(x_hat, top_acts, top_indices, fvu, auxk_loss)

    def _auxk_loss(self, pre_acts: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK loss, Gao et al. 2024, sec. 2.4 and A.2: dead latents alone try to explain the residual.

        pre_acts (n, num_latents) post-ReLU; residual (n, d_in) = x_norm - x_hat (detached);
        dead_mask (num_latents,) bool. Gradient reaches only the dead latents' encoder and decoder rows
        (and b_dec through the encoder input), giving them a signal they never get from the main loss.
        The values are post-ReLU as in the main path, so AuxK revives latents whose pre-activations are
        positive but lose the top-k competition; one that is negative on every input gets no gradient.
        """
        zero = pre_acts.new_zeros(())
        if dead_mask is None:
            return zero
        num_dead = int(dead_mask.sum().item())
        if num_dead == 0:
            return zero
        # Fewer dead latents than aux_k: use them all rather than padding with live ones.
        aux_k = min(self.cfg.aux_k, num_dead)
        dead_pre_acts = pre_acts.masked_fill(~dead_mask.to(pre_acts.device), -math.inf)
        aux_acts, aux_indices = dead_pre_acts.topk(aux_k, dim=-1, sorted=False)
        # The residual has no bias term, so predict it with the decoder alone (no b_dec).
        residual_hat = self.decode(aux_acts, aux_indices) - self.b_dec
        return _fraction_unexplained(residual, residual_hat)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale each decoder row to unit L2 norm (Gao et al. 2024, sec. A.1: after every step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the component of each decoder row's gradient along that row.

        With unit-norm rows, that component only changes the norm, which renormalisation undoes; leaving it
        in would feed Adam's moment estimates with updates that have no effect (Gao et al. 2024,
        appendix A, after Bricken et al. 2023).
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)  # (num_latents, 1)
        self.W_dec.grad -= parallel * self.W_dec

    def save(self, directory: str | Path) -> None:
        """Write ``cfg.json`` (the :class:`SAEConfig`) and ``sae.safetensors`` (weights and normaliser)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2, sort_keys=True) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
        """Inverse of :meth:`save`. Reads safetensors only (no pickle)."""
        path = Path(directory)
        raw = json.loads((path / CONFIG_FILE).read_text())
        known = {f.name for f in fields(SAEConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            logger.warning("ignoring unknown keys in %s: %s", path / CONFIG_FILE, unknown)
        cfg = SAEConfig(**{key: value for key, value in raw.items() if key in known})
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
        sae = cls(cfg, device=device, dtype=state["W_dec"].dtype)
        sae.load_state_dict(state, strict=True)
        broken = non_finite_tensors(sae)
        if broken:
            raise TrainingDiverged(f"the SAE in {path} holds NaN or infinite values in {', '.join(broken)}")
        return sae


class TrainingDiverged(ValueError):
    """The loss or the weights went non-finite: the SAE would encode every document as zeros."""


def non_finite_tensors(sae: TopKSAE) -> list[str]:
    """Names of the SAE's parameters and buffers (the normaliser included) that hold NaN or infinity."""
    return [name for name, tensor in sae.state_dict().items() if not bool(torch.isfinite(tensor).all())]


class SAETrainer:
    """Adam on a :class:`TopKSAE`, one batch at a time, counting tokens since each latent last fired."""

    def __init__(self, sae: TopKSAE, lr: float | None = None, max_grad_norm: float = 1.0):
        """lr: None uses Gao et al. 2024's width scaling, 2e-4 / sqrt(num_latents / 2**14) (appendix A)."""
        self.sae = sae
        self.lr = lr if lr is not None else 2e-4 / math.sqrt(sae.cfg.num_latents / 2**14)
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.lr)
        self.num_tokens_since_fired = torch.zeros(sae.cfg.num_latents, dtype=torch.long, device=sae.device)
        self.tokens = 0

    @property
    def dead_mask(self) -> Tensor:
        """(num_latents,) bool: latents that have not fired in ``cfg.dead_after_tokens`` tokens."""
        return self.num_tokens_since_fired >= self.sae.cfg.dead_after_tokens

    @property
    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()

    def step(self, x: Tensor) -> dict[str, float]:
        """One optimiser step on raw activations x (n, d_in). Returns fvu, auxk, dead_fraction, tokens."""
        cfg = self.sae.cfg
        dead_mask = self.dead_mask if cfg.aux_coeff > 0 else None
        out = self.sae(x, dead_mask=dead_mask)
        loss = out.fvu + cfg.aux_coeff * out.auxk_loss
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(
                f"the loss is {loss.item()} after {self.tokens} tokens (fvu {out.fvu.item()}, auxk "
                f"{out.auxk_loss.item()}) at learning rate {self.lr:.3g}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.max_grad_norm)
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()
        self._update_fired(out.top_acts, out.top_indices)
        return {
            "fvu": out.fvu.item(),
            "auxk": out.auxk_loss.item(),
            "dead_fraction": self.dead_fraction,
            "tokens": float(self.tokens),
        }

    @torch.no_grad()
    def _update_fired(self, top_acts: Tensor, top_indices: Tensor) -> None:
        """A latent fired if it was selected with a positive value for any row of the batch."""
        fired = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
        fired[top_indices[top_acts > 0]] = True
        self.num_tokens_since_fired += top_acts.shape[0]
        self.num_tokens_since_fired[fired] = 0
        self.tokens += top_acts.shape[0]


def _check_batch(batch: Tensor, d_in: int) -> Tensor:
    if batch.ndim != 2 or batch.shape[1] != d_in:
        raise ValueError(
            f"train_sae expects (n, d_in={d_in}) activation rows with skipped positions and padding "
            f"already removed, got {tuple(batch.shape)}"
        )
    return batch


def _take_normalizer_sample(
    batches: Iterator[Tensor], d_in: int, normalizer_tokens: int
) -> tuple[list[Tensor], Tensor]:
    """Buffer leading batches until >= normalizer_tokens rows; returns (buffered batches, their rows)."""
    buffered: list[Tensor] = []
    rows = 0
    for batch in batches:
        buffered.append(_check_batch(batch, d_in))
        rows += batch.shape[0]
        if rows >= normalizer_tokens:
            break
    if rows < 2:
        raise ValueError(f"train_sae needs at least 2 activation rows, got {rows}")
    return buffered, torch.cat(buffered)


def train_sae(
    batches: Iterable[Tensor],
    cfg: SAEConfig,
    max_tokens: int | None = None,
    log_every: int = 50,
    normalizer_tokens: int = 8192,
    lr: float | None = None,
    seed: int = 0,
) -> tuple[TopKSAE, dict]:
    """Train a Top-K SAE on raw activation batches, each (n, d_in), one optimiser step per batch.

    The normaliser is fitted on the first >= ``normalizer_tokens`` rows (those batches are buffered and
    then trained on like the rest). Training stops when the batches run out or after ``max_tokens`` rows.
    ``lr`` None uses :class:`SAETrainer`'s default (Gao et al.'s width-scaled rule). ``seed`` draws the
    initial weights (the only random numbers here), so the result is a function of the batches, in their
    order, and the arguments. Rows over the normaliser's ``max_input_norm`` (attention sinks) are dropped,
    and counted.

    Returns the SAE (on the first batch's device) and ``{"fvu" (mean of the last ``log_every`` steps),
    "dead_fraction", "tokens", "tokens_per_s" (from the first step on), "steps", "sink_tokens",
    "first_step_s" (the wait before it: for a stream, its start and the normaliser's sample)}``.
    """
    called = time.perf_counter()
    iterator = iter(batches)
    buffered, sample = _take_normalizer_sample(iterator, cfg.d_in, normalizer_tokens)
    sae = TopKSAE(cfg, device=sample.device, seed=seed)
    sae.fit_normalizer(sample)
    # b_dec starts at the data mean (Gao et al. 2024, sec. A.1 use the geometric median); in normalised
    # space that mean is 0, which is already its value.
    del sample
    trainer = SAETrainer(sae, lr=lr)
    logger.info(
        "training SAE: d_in=%d num_latents=%d k=%d aux_k=%d lr=%.2e input_scale=%.4g",
        cfg.d_in, cfg.num_latents, cfg.k, cfg.aux_k, trainer.lr, sae.input_scale.item(),
    )  # fmt: skip
    recent_fvu: deque[float] = deque(maxlen=max(1, log_every))
    steps, start = 0, time.perf_counter()
    sinks = 0
    for batch in _chain(buffered, iterator):
        batch = _check_batch(batch, cfg.d_in)
        kept = sae.keep(batch)
        if not bool(kept.all()):
            sinks += int((~kept).sum())
            batch = batch[kept]
            if batch.shape[0] == 0:
                continue
        if max_tokens is not None:
            batch = batch[: max_tokens - trainer.tokens]  # the last batch may be cut short
            if batch.shape[0] == 0:
                break
        metrics = trainer.step(batch)
        recent_fvu.append(metrics["fvu"])
        steps += 1
        if steps % log_every == 0:
            _log_progress(steps, trainer, recent_fvu, start)
    _check_trained(sae, steps)
    summary = {**_summary(steps, trainer, recent_fvu, start), "sink_tokens": sinks, "first_step_s": start - called}
    logger.info("SAE done: %s", summary)
    return sae, summary


def _check_trained(sae: TopKSAE, steps: int) -> None:
    if steps == 0:
        raise ValueError("train_sae got no training rows (max_tokens=0?)")
    if broken := non_finite_tensors(sae):
        raise TrainingDiverged(f"training ended with NaN or infinite values in {', '.join(broken)}")


def _chain(first: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    """Yield the buffered batches (releasing each once used) and then the rest of the iterator."""
    pending = deque(first)
    first.clear()
    while pending:
        yield pending.popleft()
    yield from rest


def _summary(steps: int, trainer: SAETrainer, recent_fvu: deque[float], start: float) -> dict:
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {
        "fvu": sum(recent_fvu) / len(recent_fvu),
        "dead_fraction": trainer.dead_fraction,
        "tokens": trainer.tokens,
        "tokens_per_s": trainer.tokens / elapsed,
        "steps": steps,
    }


def _log_progress(steps: int, trainer: SAETrainer, recent_fvu: deque[float], start: float) -> None:
    summary = _summary(steps, trainer, recent_fvu, start)
    logger.info(
        "step %d: tokens=%d fvu=%.4f dead_fraction=%.3f tokens/s=%.0f",
        steps, summary["tokens"], summary["fvu"], summary["dead_fraction"], summary["tokens_per_s"],
    )  # fmt: skip
