"""Encoding core: micro-batching, padding, pooling, the document encoder and coordinate selection."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from curation.encode import (
    DocumentEncoder,
    EncodeDocuments,
    EncoderSettings,
    cosine_scores,
    dense_codes,
    l2_normalize,
    length_batches,
    mean_pool,
    pad_right,
    pooling_mask,
    weighted_unit,
)
from curation.sae.coords import jacobian_row_norms, mean_magnitude, select_coords
from curation.sae.model import SAEConfig, TopKSAE

HIDDEN = 64  # the tiny model's hidden size (conftest.build_tiny_model)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread (see conftest.one_torch_thread)."""


def random_docs(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """Token-id lists of random lengths in [low, high], ids from the tiny vocabulary (not pad or special)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, 230) for _ in range(rng.randint(low, high))] for _ in range(count)]


# --- length_batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("budget", "max_rows"), [(64, 64), (200, 4), (1000, 64)])
def test_length_batches_cover_every_row_once_within_budget(seed, budget, max_rows):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 80))]

    batches = length_batches(lengths, budget, max_batch_size=max_rows)

    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    # Sorted longest first, across and within micro-batches.
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= max_rows
        assert len(batch) * longest <= budget or len(batch) == 1


def test_length_batches_give_an_over_long_row_its_own_batch():
    lengths = [5, 100, 5, 7]
    assert length_batches(lengths, max_batch_tokens=50, max_padding=1.0) == [[1], [3, 0, 2]]


def test_length_batches_cap_padding_per_row():
    # 7 then 5: a 5-token row padded to 7 wastes 29% > 20%, so it starts a new micro-batch.
    assert length_batches([5, 100, 5, 7], max_batch_tokens=50) == [[1], [3], [0, 2]]
    batches = length_batches([100, 95, 90, 81, 80, 50], max_batch_tokens=10_000, max_padding=0.2)
    assert batches == [[0, 1, 2, 3, 4], [5]]  # 80 is exactly 20% below 100: still in
    lengths = [100, 95, 90, 81, 80, 50]
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert all(lengths[i] >= 0.8 * longest for i in batch)


def test_length_batches_fill_up_to_the_budget():
    # 4 rows of 10 tokens fit a 40-token budget exactly; the fifth starts a new batch.
    assert [len(batch) for batch in length_batches([10] * 5, max_batch_tokens=40)] == [4, 1]


def test_length_batches_of_nothing():
    assert length_batches([], 100) == []


# --- padding, masks, pooling ------------------------------------------------------------------------


def test_pad_right_pads_ids_and_masks_padding():
    ids, mask = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_pooling_mask_drops_position_zero_and_padding():
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    mask = pooling_mask(attention, skip_positions=1)
    assert mask.tolist() == [
        [False, True, True, False],
        [False, True, False, False],
        [False, True, True, True],
    ]
    assert attention.tolist()[0] == [1, 1, 1, 0]  # the input is left as it was


def test_pooling_mask_keeps_the_only_token_of_a_short_doc():
    attention = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    assert pooling_mask(attention, skip_positions=1).tolist() == [
        [True, False, False],
        [False, True, True],
        [False, True, False],
    ]
    # skip 2: the 2-token doc keeps its last real token, not padding.
    assert pooling_mask(attention, skip_positions=2).tolist() == [
        [True, False, False],
        [False, False, True],
        [False, True, False],
    ]


def test_pooling_mask_without_skipping_is_the_attention_mask():
    attention = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pooling_mask(attention, skip_positions=0).tolist() == attention.bool().tolist()


def test_mean_pool_averages_masked_in_tokens_only():
    values = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [1e6, -1e6]],  # last token masked out: must not leak in
            [[2.0, 2.0], [-1e6, 5.0], [4.0, 0.0]],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert mean_pool(values, mask).tolist() == [[2.0, 3.0], [3.0, 1.0]]


def test_mean_pool_of_an_empty_mask_is_zero_not_nan():
    pooled = mean_pool(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool))
    assert pooled.tolist() == [[0.0, 0.0]]


def test_l2_normalize_and_cosine_scores():
    vectors = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    unit = l2_normalize(vectors)
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))
    seeds = l2_normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(cosine_scores(unit, seeds), torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))


# --- DocumentEncoder on the tiny model --------------------------------------------------------------


def make_encoder(model_dir: str, sae: TopKSAE | None = None, **spec_fields) -> DocumentEncoder:
    spec = EncoderSettings(model=model_dir, sae_dir=None, layer=spec_fields.pop("layer", 2), **spec_fields)
    return DocumentEncoder(spec, sae=sae)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> DocumentEncoder:
    # A small token budget cuts a mixed batch into several micro-batches, each padded differently.
    return make_encoder(tiny_model_dir, max_batch_tokens=48)


def test_encode_gives_unit_vectors_in_input_order(encoder):
    docs = random_docs(9, 1, 30, seed=1)
    vectors = encoder.encode(docs)
    assert vectors.shape == (9, HIDDEN)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(9))
    # Row i is document i, whatever micro-batch it was run in.
    for index in (0, 4, 8):
        torch.testing.assert_close(vectors[index], encoder.encode([docs[index]])[0], atol=1e-5, rtol=0)


def test_encode_does_not_depend_on_batch_company(encoder, tiny_model_dir):
    target = random_docs(1, 12, 12, seed=2)[0]
    alone = encoder.encode([target])[0]
    others = random_docs(10, 1, 40, seed=3)
    # Same doc among shorter and longer docs: padded to 40 in one big batch, and re-batched in small ones.
    one_batch = make_encoder(tiny_model_dir, max_batch_tokens=8192).encode([*others[:5], target, *others[5:]])[5]
    small_batches = encoder.encode([*others[:5], target, *others[5:]])[5]
    torch.testing.assert_close(one_batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(small_batches, alone, atol=1e-5, rtol=0)


def test_micro_batches_hold_at_most_max_batch_rows_documents(tiny_model_dir, monkeypatch):
    import curation.encode

    sizes = []

    def recording(lengths, max_batch_tokens, max_batch_size):
        batches = length_batches(lengths, max_batch_tokens, max_batch_size)
        sizes.extend(len(batch) for batch in batches)
        return batches

    monkeypatch.setattr(curation.encode, "length_batches", recording)
    docs = random_docs(40, 10, 12, seed=6)
    wide = make_encoder(tiny_model_dir, max_batch_tokens=8192, max_batch_rows=1024).encode(docs)
    assert sizes == [40]
    sizes.clear()
    narrow = make_encoder(tiny_model_dir, max_batch_tokens=8192, max_batch_rows=16).encode(docs)
    assert max(sizes) == 16 and sum(sizes) == 40
    torch.testing.assert_close(narrow, wide, atol=1e-5, rtol=0)


def test_encode_is_the_mean_of_the_layer_after_position_zero(encoder):
    doc = random_docs(1, 7, 7, seed=4)[0]
    hidden = encoder.forward(torch.tensor([doc]), torch.ones(1, len(doc), dtype=torch.long))[0]
    expected = l2_normalize(hidden[1:].mean(dim=0))
    torch.testing.assert_close(encoder.encode([doc])[0], expected, atol=1e-6, rtol=0)


def test_activations_are_every_counted_token(encoder):
    docs = random_docs(6, 2, 25, seed=5)
    rows = encoder.activations(docs)
    assert rows.shape == (sum(len(doc) - 1 for doc in docs), HIDDEN)
    # The rows are the layer's hidden states at positions 1.. of each document (micro-batch order).
    expected = []
    for batch in length_batches([len(doc) for doc in docs], encoder.spec.max_batch_tokens):
        for index in batch:
            doc = docs[index]
            hidden = encoder.forward(torch.tensor([doc]), torch.ones(1, len(doc), dtype=torch.long))[0]
            expected.append(hidden[1:])
    torch.testing.assert_close(rows, torch.cat(expected), atol=1e-5, rtol=0)


def test_activations_never_include_skipped_positions(encoder):
    # docs/design.md: the attention-sink position 0 stays out of SAE training and normalisation, even for a
    # one-token document (pooling may fall back to it so a vector is never empty; training must not).
    docs = [[7], [8, 9, 10], [11]]
    assert encoder.activations(docs).shape == (2, HIDDEN)


def test_activations_read_only_the_chosen_coords(tiny_model_dir):
    coords = [3, 10, 40, 63]
    encoder = make_encoder(tiny_model_dir, coords=coords)
    full = make_encoder(tiny_model_dir)
    docs = random_docs(3, 4, 9, seed=6)
    torch.testing.assert_close(encoder.activations(docs), full.activations(docs)[:, coords])


def test_encode_with_sae_gives_latent_vectors(encoder, tiny_model_dir):
    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    sae.fit_normalizer(encoder.activations(random_docs(20, 5, 30, seed=7)))
    with_sae = make_encoder(tiny_model_dir, sae=sae, max_batch_tokens=48)
    docs = random_docs(5, 1, 30, seed=8)

    vectors = with_sae.encode(docs)

    assert vectors.shape == (5, sae.cfg.num_latents) == (5, 16 * HIDDEN)
    assert (vectors >= 0).all()  # pooled Top-K codes are non-negative
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5))
    # A one-token doc pools one token's code: at most k latents are active.
    assert int((with_sae.encode([[9]])[0] > 0).sum()) <= 8
    torch.testing.assert_close(with_sae.encode([docs[2]])[0], vectors[2], atol=1e-5, rtol=0)


def test_latent_weights_scale_the_pooled_vector_before_it_is_normalised(encoder, tiny_model_dir):
    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    sae.fit_normalizer(encoder.activations(random_docs(20, 5, 30, seed=7)))
    docs = random_docs(6, 5, 30, seed=9)
    plain = make_encoder(tiny_model_dir, sae=sae).encode(docs)
    weights = torch.linspace(0.5, 3.0, sae.cfg.num_latents)
    weighted = make_encoder(tiny_model_dir, sae=sae, latent_weights=weights.tolist()).encode(docs)
    expected = plain * weights
    torch.testing.assert_close(weighted, expected / expected.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(weighted, plain, atol=1e-3)
    with pytest.raises(ValueError, match="latent weights"):
        make_encoder(tiny_model_dir, sae=sae, latent_weights=[1.0, 2.0])


@pytest.mark.parametrize("pooling", ["rate", "mean"])
def test_the_stored_sparse_code_gives_back_each_documents_vector(encoder, tiny_model_dir, pooling):
    """scored/ keeps each document's pooled code before the weights, sparse: the vector curate scored comes back
    from it exactly, under any weighting (curation/selection/reselect.py scores from it)."""
    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    sae.fit_normalizer(encoder.activations(random_docs(20, 5, 30, seed=7)))
    weights = torch.linspace(0.5, 3.0, sae.cfg.num_latents)
    spec = EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, pooling=pooling, max_batch_tokens=48,
                           latent_weights=weights.tolist())  # fmt: skip
    docs = random_docs(9, 1, 30, seed=11)
    actor = EncodeDocuments(spec, np.eye(3, sae.cfg.num_latents, dtype=np.float32), sae=sae)
    batch = actor({"input_ids": np.array([np.array(doc) for doc in docs], dtype=object),
                   "n_tokens": np.array([len(doc) for doc in docs])})  # fmt: skip
    latents, values = batch["code_latents"], batch["code_values"]
    assert str(latents.type) == "list<item: int32>" and str(values.type) == "list<item: float>"
    for row in latents.to_pylist():
        assert row == sorted(set(row)) and 0 < len(row) < sae.cfg.num_latents  # sparse: only what fired
    pooled = dense_codes(latents, values, sae.cfg.num_latents)
    encoded = actor.encoder.encode_codes(docs)
    assert torch.equal(pooled, encoded.pooled)
    assert torch.equal(weighted_unit(pooled, weights), encoded.vectors)
    np.testing.assert_array_equal(cosine_scores(encoded.vectors, actor.seed_vectors).numpy(), batch["seed_sims"])
    with pytest.raises(ValueError, match="another SAE"):
        dense_codes(latents, values, 4)


def test_a_passed_in_sae_moves_to_the_encoders_device(tiny_model_dir):
    """Curation builds the SAE once and hands it to every encoder actor: on a GPU actor it must follow the
    model to CUDA. "meta" stands in for a second device on a CPU-only machine."""
    from curation.encode import DocumentEncoder, EncoderSettings

    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    encoder = DocumentEncoder(EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, device="meta"), sae=sae)
    assert next(encoder.forward.parameters()).device.type == "meta"
    assert encoder.sae.device.type == "meta"


@pytest.mark.parametrize("pooling", ["rate", "mean"])
def test_sae_pooling_by_hand(encoder, tiny_model_dir, pooling):
    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    sae.fit_normalizer(encoder.activations(random_docs(20, 5, 30, seed=7)))
    doc = random_docs(1, 9, 9, seed=9)[0]
    hidden = encoder.forward(torch.tensor([doc]), torch.ones(1, len(doc), dtype=torch.long))[0]
    codes = sae.encode_dense(hidden[1:])  # (tokens after position 0, latents)
    # rate: the share of the 8 counted tokens on which each latent fires; mean: the mean code.
    pooled = (codes > 0).float().mean(dim=0) if pooling == "rate" else codes.mean(dim=0)

    vector = make_encoder(tiny_model_dir, sae=sae, pooling=pooling).encode([doc])[0]

    torch.testing.assert_close(vector, l2_normalize(pooled), atol=1e-6, rtol=0)
    if pooling == "rate":
        # Unnormalised, every entry is a multiple of 1/8 and each token fires exactly k latents.
        rates = vector * pooled.norm()
        torch.testing.assert_close(rates * 8, (rates * 8).round(), atol=1e-4, rtol=0)
        assert abs(float(pooled.sum()) - 8) < 1e-5


def test_tokens_over_the_saes_norm_limit_pool_nothing(encoder, tiny_model_dir):
    """Attention sinks past position 0 (tokens over the SAE's `max_input_norm`) are left out of pooling; a
    document made only of them still gets its vector from them."""
    sae = TopKSAE(SAEConfig(d_in=HIDDEN, k=8, layer=2))
    sae.fit_normalizer(encoder.activations(random_docs(20, 5, 30, seed=7)))
    doc = random_docs(1, 9, 9, seed=9)[0]
    hidden = encoder.forward(torch.tensor([doc]), torch.ones(1, len(doc), dtype=torch.long))[0][1:]
    norms = hidden.norm(dim=1)
    sae.cfg.max_input_norm = float(norms.sort().values[-3])  # the two largest tokens count as sinks
    kept = norms <= sae.cfg.max_input_norm
    assert int(kept.sum()) == len(doc) - 3
    pooled = (sae.encode_dense(hidden[kept]) > 0).float().mean(dim=0)
    with_limit = make_encoder(tiny_model_dir, sae=sae)
    torch.testing.assert_close(with_limit.encode([doc])[0], l2_normalize(pooled), atol=1e-6, rtol=0)
    sae.cfg.max_input_norm = float(norms.min()) / 2  # every token over the limit: all of them count
    everything = (sae.encode_dense(hidden) > 0).float().mean(dim=0)
    torch.testing.assert_close(make_encoder(tiny_model_dir, sae=sae).encode([doc])[0], l2_normalize(everything))


# --- coordinate selection ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_width_encoder(tiny_model_dir) -> DocumentEncoder:
    return make_encoder(tiny_model_dir)


@pytest.mark.parametrize("selector", ["jacobian", "magnitude"])
def test_select_coords_returns_sorted_distinct_indices(full_width_encoder, selector):
    coords = select_coords(full_width_encoder, random_docs(4, 3, 12, seed=9), selector, num_coords=16)
    assert len(coords) == 16
    assert coords == sorted(set(coords))
    assert all(0 <= c < HIDDEN for c in coords)


def test_select_coords_all_is_every_coordinate(full_width_encoder):
    assert select_coords(full_width_encoder, random_docs(2, 3, 5), "all", num_coords=16) == list(range(HIDDEN))


@pytest.mark.parametrize("num_coords", [0, HIDDEN + 1])
def test_select_coords_out_of_range_names_num_coords(full_width_encoder, num_coords):
    with pytest.raises(ConfigError) as excinfo:
        select_coords(full_width_encoder, random_docs(2, 3, 5), "magnitude", num_coords=num_coords)
    assert excinfo.value.field == "num_coords"
    assert f"1..{HIDDEN}" in str(excinfo.value)


def test_magnitude_picks_the_largest_mean_absolute_activations(full_width_encoder):
    docs = random_docs(5, 3, 15, seed=10)
    counted = full_width_encoder.activations(docs)  # (tokens, d_model), position 0 left out
    torch.testing.assert_close(mean_magnitude(full_width_encoder, docs), counted.abs().mean(dim=0))
    expected = sorted(counted.abs().mean(dim=0).topk(10).indices.tolist())
    assert select_coords(full_width_encoder, docs, "magnitude", num_coords=10) == expected


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two 1-D tensors without ties."""
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).float()
    return float(torch.corrcoef(ranks)[0, 1])


def exact_row_norms(encoder: DocumentEncoder, doc: list[int]) -> torch.Tensor:
    """(d_model,) mean over positions 1.. of ||d h_L[t, i] / d x||^2, x all input embeddings, by autograd."""
    base = encoder.forward.base
    embeds = base.get_input_embeddings()(torch.tensor([doc])).detach()
    attention = torch.ones(1, len(doc), dtype=torch.long)

    def layer_output(inputs: torch.Tensor) -> torch.Tensor:
        return base(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state

    with torch.enable_grad():
        jacobian = torch.autograd.functional.jacobian(layer_output, embeds, vectorize=True)  # (1, T, d, 1, T, d)
    rows = jacobian[0, :, :, 0].reshape(len(doc), HIDDEN, -1)  # (T, d_model, T * d_model)
    return rows[1:].pow(2).sum(dim=-1).mean(dim=0)


def test_jacobian_estimate_matches_autograd(full_width_encoder):
    doc = random_docs(1, 8, 8, seed=11)[0]
    exact = exact_row_norms(full_width_encoder, doc)
    estimate = jacobian_row_norms(full_width_encoder, [doc], probes=128)

    # The probes are unit vectors per token, so E[(Jv)_i^2] = ||J_i||^2 / d_model: compare up to scale.
    relative_error = (estimate / estimate.sum() - exact / exact.sum()).abs() / (exact / exact.sum())
    # Row norms of a random tiny model differ by only ~25%, so ranks are the hard part; 128 probes
    # gave a mean relative error of ~0.07, rho ~0.92 and 14 of 16 shared top coordinates here.
    assert relative_error.mean() < 0.12
    assert rank_correlation(estimate, exact) > 0.8
    top_estimate = set(estimate.topk(16).indices.tolist())
    top_exact = set(exact.topk(16).indices.tolist())
    assert len(top_estimate & top_exact) >= 11


def test_a_bfloat16_forward_gives_the_float32_vectors_within_rounding(tiny_model_dir):
    """`dtype=bfloat16` on a CPU runs the truncated forward's matmuls in bf16 (autocast) and keeps the weights,
    the residual stream and everything after the forward in float32."""
    from curation.encode import DocumentEncoder, EncoderSettings

    docs = random_docs(12, 5, 40, seed=3)
    vectors, hidden = {}, {}
    for dtype in ("float32", "bfloat16"):
        spec = EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, dtype=dtype, bf16_min_tokens=0)
        encoder = DocumentEncoder(spec)
        assert next(encoder.forward.parameters()).dtype == torch.float32
        vectors[dtype] = encoder.encode(docs)
        assert vectors[dtype].dtype == torch.float32
        hidden[dtype] = torch.cat([h[m] for _, h, m in encoder.hidden_batches(docs)])
    cosines = (vectors["float32"] * vectors["bfloat16"]).sum(dim=1)
    assert cosines.min() >= 0.99, cosines
    assert not torch.equal(vectors["float32"], vectors["bfloat16"])  # the matmuls did run in bf16
    # The residual stream stayed in float32: with bf16 weights every activation would sit on bf16's grid.
    on_grid = hidden["bfloat16"] == hidden["bfloat16"].bfloat16().float()
    assert on_grid.float().mean() < 0.5, on_grid.float().mean()


def test_short_documents_stay_in_float32_under_bfloat16(tiny_model_dir):
    """A micro-batch whose shortest document is under `bf16_min_tokens` runs in float32: those documents get
    the float32 encoder's vectors bit for bit (length batching cuts the same micro-batches in both), while
    the micro-batches of longer documents do run in bf16."""
    docs = random_docs(40, 3, 60, seed=13)
    fp32 = make_encoder(tiny_model_dir, max_batch_tokens=256).encode(docs)
    mixed = make_encoder(tiny_model_dir, max_batch_tokens=256, dtype="bfloat16", bf16_min_tokens=20).encode(docs)
    short = torch.tensor([len(doc) < 20 for doc in docs])
    assert 5 <= int(short.sum()) <= 35
    assert torch.equal(mixed[short], fp32[short])
    changed = (mixed != fp32).any(dim=1)
    assert bool(changed[~short].any())
    assert float((mixed * fp32).sum(dim=1).min()) >= 0.99


def test_bfloat16_autocast_is_closer_to_float32_than_bfloat16_weights(tiny_model_dir):
    """What autocast buys: the layer activations are nearer the fp32 ones than with the whole model in bf16."""
    from core.models import TruncatedForward, load_model

    docs = random_docs(8, 20, 40, seed=5)
    ids = torch.tensor([doc[:20] for doc in docs])
    attention = torch.ones_like(ids)
    exact = TruncatedForward(load_model(tiny_model_dir), 2)(ids, attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = TruncatedForward(load_model(tiny_model_dir), 2)(ids, attention).float()
    rounded = TruncatedForward(load_model(tiny_model_dir, dtype=torch.bfloat16), 2)(ids, attention).float()
    assert (mixed - exact).abs().mean() < (rounded - exact).abs().mean()


def test_auto_dtype_follows_the_device(tiny_model_dir, monkeypatch):
    """`auto` runs the forward under bf16 autocast where the CPU computes bf16 natively, in float32 where it
    does not; the weights stay in float32 either way."""
    from core import placement
    from curation.encode import DocumentEncoder, EncoderSettings

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(placement, "native_bf16", lambda device, native=native: native)
        encoder = DocumentEncoder(EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, dtype="auto"))
        assert next(encoder.forward.parameters()).dtype == torch.float32
        assert encoder.autocast == native
        assert encoder.dtype == str(dtype).removeprefix("torch.")


def test_seeds_are_encoded_in_float32_whatever_the_corpus_dtype(tiny_model_dir):
    """Every corpus document is scored against the seed vectors, so they are computed in float32 even when the
    corpus is encoded in bfloat16."""
    from curation.encode_pipeline import _encode_seeds, seed_vectors
    from curation.seeds import Seeds

    seeds = Seeds(texts=["the cell divides and the gene is copied " * 4, "a bond yields interest " * 6],
                  domains=["bio", "finance"])  # fmt: skip
    spec = EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, dtype="bfloat16", bf16_min_tokens=0)
    vectors, decision = _encode_seeds(spec, None, seeds, max_tokens=64)
    exact = seed_vectors(make_encoder(tiny_model_dir), seeds, max_tokens=64)
    rounded = seed_vectors(DocumentEncoder(spec), seeds, max_tokens=64)
    assert np.array_equal(vectors, exact)
    assert not np.array_equal(vectors, rounded)
    assert decision == {"asked": "bfloat16", "device": "cpu", "dtype": "bfloat16"}  # the corpus's, recorded


def test_the_curate_stage_passes_its_micro_batch_size_to_the_encoder():
    from curation.encode_pipeline import _encoder_spec
    from curation.sae.model import SAEConfig, TopKSAE
    from curation.selection.curate import CurateConfig

    config = CurateConfig(corpus=["c/*.jsonl"], seeds="s.jsonl", sae="sae", out="out", max_batch_tokens=65536,
                          max_batch_rows=1024)  # fmt: skip
    spec = _encoder_spec(config, "model", TopKSAE(SAEConfig(d_in=8, expansion_factor=2, k=2, layer=1)), None)
    assert (spec.max_batch_tokens, spec.max_batch_rows) == (65536, 1024)
    assert EncoderSettings(model="m", sae_dir=None, layer=1).max_batch_rows == 64  # the CPU-sized default
