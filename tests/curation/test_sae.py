"""Top-K SAE: sparsity, decoder geometry, normalisation, AuxK, training on planted dictionaries, I/O."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from curation.sae.model import SAEConfig, SAETrainer, TopKSAE, train_sae


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread (see conftest.one_torch_thread)."""


def planted_dictionary(num_atoms: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """(num_atoms, d_in) random unit-norm atoms."""
    atoms = torch.randn(num_atoms, d_in, generator=generator)
    return atoms / atoms.norm(dim=1, keepdim=True)


def sparse_samples(atoms: torch.Tensor, n: int, active: int, generator: torch.Generator) -> torch.Tensor:
    """(n, d_in) rows that are exactly `active`-sparse in `atoms`, with coefficients in [1, 2)."""
    chosen = torch.rand(n, atoms.shape[0], generator=generator).argsort(dim=1)[:, :active]  # (n, active)
    coefficients = 1.0 + torch.rand(n, active, generator=generator)
    return (coefficients[..., None] * atoms[chosen]).sum(dim=1)


# --- config ---------------------------------------------------------------------------------------


def test_config_resolves_width_and_aux_k():
    cfg = SAEConfig(d_in=96, expansion_factor=16, k=32)
    assert cfg.num_latents == 1536
    assert cfg.aux_k == 48  # d_in // 2, Gao et al.
    explicit = SAEConfig(d_in=96, num_latents=200, k=8, aux_k=10)
    assert (explicit.num_latents, explicit.aux_k) == (200, 10)


def test_config_error_names_k_and_fix():
    with pytest.raises(ConfigError) as excinfo:
        SAEConfig(d_in=96, expansion_factor=16, k=5000)
    assert excinfo.value.field == "k"
    assert excinfo.value.value == 5000
    assert "num_latents=1536" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d_in": 0}, "d_in"),
        ({"d_in": 8, "k": 0}, "k"),
        ({"d_in": 8, "expansion_factor": 2, "k": 2, "aux_k": 17}, "aux_k"),
        ({"d_in": 8, "coords": [0, 1, 2]}, "coords"),
        ({"d_in": 2, "coords": [3, 3]}, "coords"),
        ({"d_in": 8, "dead_after_tokens": 0}, "dead_after_tokens"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, field: str):
    with pytest.raises(ConfigError) as excinfo:
        SAEConfig(**kwargs)
    assert excinfo.value.field == field


# --- model geometry and sparsity --------------------------------------------------------------------


def test_init_encoder_is_decoder_transpose_with_unit_rows():
    sae = TopKSAE(SAEConfig(d_in=16, expansion_factor=4, k=4))
    assert sae.W_dec.shape == sae.W_enc.shape == (64, 16)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # a copy, trained separately
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_exactly_k_active_latents_per_token():
    cfg = SAEConfig(d_in=32, expansion_factor=8, k=8)
    sae = TopKSAE(cfg)
    x = 3.0 + 2.0 * torch.randn(4, 50, cfg.d_in)  # leading dims (batch, tokens) are kept
    sae.fit_normalizer(x.reshape(-1, cfg.d_in))
    with torch.no_grad():
        top_acts, top_indices = sae.encode(x)
        dense = sae.encode_dense(x)
    assert top_acts.shape == top_indices.shape == (4, 50, cfg.k)
    assert ((top_acts > 0).sum(dim=-1) == cfg.k).all()
    sorted_indices = top_indices.sort(dim=-1).values
    assert (sorted_indices[..., 1:] != sorted_indices[..., :-1]).all()  # unique per row
    assert dense.shape == (4, 50, cfg.num_latents)
    assert ((dense != 0).sum(dim=-1) == cfg.k).all()
    assert torch.equal(dense.gather(-1, top_indices), top_acts)
    # The k kept values are the k largest pre-activations.
    pre_acts = torch.relu(torch.nn.functional.linear(sae.normalize(x) - sae.b_dec, sae.W_enc, sae.b_enc))
    torch.testing.assert_close(top_acts.sort(dim=-1).values, pre_acts.topk(cfg.k).values.sort(dim=-1).values)
    # Sparse decode equals the dense code through the decoder.
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(top_acts, top_indices), dense @ sae.W_dec + sae.b_dec)


def test_relu_can_leave_fewer_than_k_active():
    cfg = SAEConfig(d_in=8, expansion_factor=4, k=4)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # every pre-activation is negative
        sae.b_enc[:2] = 1e3  # except two latents
        dense = sae.encode_dense(torch.randn(10, cfg.d_in))
    assert ((dense != 0).sum(dim=-1) == 2).all()
    assert (dense[:, :2] > 0).all()


def test_decoder_stays_unit_norm_and_parallel_gradient_is_removed():
    cfg = SAEConfig(d_in=16, expansion_factor=4, k=4)
    sae = TopKSAE(cfg)
    trainer = SAETrainer(sae, lr=5e-2)  # large steps, so drift would show
    for _ in range(10):
        trainer.step(torch.randn(64, cfg.d_in) * 4 + 1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.num_latents), atol=1e-5, rtol=0)
    assert not torch.equal(sae.W_enc, sae.W_dec)  # they train separately

    sae.zero_grad()
    sae(torch.randn(64, cfg.d_in)).fvu.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() > 1e-4
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-6


def test_fvu_definition():
    cfg = SAEConfig(d_in=8, expansion_factor=4, k=4)
    sae = TopKSAE(cfg)
    x = torch.randn(32, cfg.d_in)
    with torch.no_grad():
        out = sae(x)
    x_norm = sae.normalize(x)
    expected = (x_norm - out.x_hat).pow(2).sum() / (x_norm - x_norm.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, expected)
    assert out.auxk_loss.item() == 0.0  # no dead mask


# --- normaliser -------------------------------------------------------------------------------------


def test_normalizer_centres_and_scales_to_d_in():
    d_in = 24
    # Anisotropic activations far from the origin, like a real layer.
    raw = 5.0 + torch.randn(4096, d_in) * torch.linspace(0.1, 30.0, d_in)
    sae = TopKSAE(SAEConfig(d_in=d_in, expansion_factor=2, k=4))
    sae.fit_normalizer(raw)
    x_norm = sae.normalize(raw)
    assert x_norm.mean(dim=0).abs().max() < 1e-4
    torch.testing.assert_close(x_norm.pow(2).sum(dim=1).mean(), torch.tensor(float(d_in)), rtol=1e-5, atol=0)
    # One scalar scale: relative geometry between coordinates is kept.
    assert sae.input_scale.shape == ()
    fresh = sae.normalize(5.0 + torch.randn(4096, d_in) * torch.linspace(0.1, 30.0, d_in))
    assert abs(fresh.pow(2).sum(dim=1).mean().item() / d_in - 1.0) < 0.05


# --- AuxK -------------------------------------------------------------------------------------------


def test_auxk_loss_trains_only_dead_latents():
    cfg = SAEConfig(d_in=16, expansion_factor=4, k=4, aux_k=8)
    sae = TopKSAE(cfg)
    x = torch.randn(128, cfg.d_in)
    dead_mask = torch.zeros(cfg.num_latents, dtype=torch.bool)
    dead_mask[:20] = True
    assert sae(x, dead_mask=torch.zeros_like(dead_mask)).auxk_loss.item() == 0.0
    out = sae(x, dead_mask=dead_mask)
    assert out.auxk_loss.item() > 0
    sae.zero_grad()
    out.auxk_loss.backward()
    decoder_rows_touched = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert decoder_rows_touched[:20].any()
    assert not decoder_rows_touched[20:].any()
    assert not sae.b_enc.grad[20:].any()


def _planted_dead_sae(
    atoms: torch.Tensor, live: torch.Tensor, dead: torch.Tensor, aux_coeff: float, sample: torch.Tensor
) -> TopKSAE:
    cfg = SAEConfig(
        d_in=atoms.shape[1],
        num_latents=atoms.shape[0],
        k=4,
        aux_coeff=aux_coeff,
        dead_after_tokens=1024,
    )
    torch.manual_seed(1)  # same random decoder rows for both runs
    sae = TopKSAE(cfg)
    sae.fit_normalizer(sample)
    with torch.no_grad():
        sae.W_dec[live] = atoms[live]
        sae.W_enc[live] = atoms[live]
        # The dead half is only weakly tuned to the atoms that the live half cannot explain: positive
        # pre-activations, but always beaten to the top-k by the live latents' cross-talk. (A latent whose
        # pre-activation is negative on every input gets no gradient from AuxK either: its values are
        # post-ReLU, as in the main path.)
        sae.W_enc[dead] = 0.05 * atoms[dead]
    return sae


def test_auxk_revives_dead_latents_in_planted_case():
    generator = torch.Generator().manual_seed(1)
    atoms = planted_dictionary(64, 32, generator)
    live, dead = torch.arange(32), torch.arange(32, 64)
    sample = sparse_samples(atoms, 4096, active=3, generator=generator)
    batches = [sparse_samples(atoms, 256, active=3, generator=generator) for _ in range(500)]
    results = {}
    for aux_coeff in (1 / 32, 0.0):
        sae = _planted_dead_sae(atoms, live, dead, aux_coeff, sample)
        trainer = SAETrainer(sae)
        trainer.num_tokens_since_fired[dead] = sae.cfg.dead_after_tokens  # dead from the start
        assert trainer.dead_fraction == 0.5
        fvu = [trainer.step(batch)["fvu"] for batch in batches]
        results[aux_coeff] = (trainer.dead_mask, sum(fvu[-50:]) / 50)
    dead_with_auxk, fvu_with_auxk = results[1 / 32]
    dead_without, fvu_without = results[0.0]
    # Measured over 7 seeds: without AuxK 28 to 32 of the 32 stay dead; with it 0 to 2 are left.
    assert dead_without[dead].float().mean() >= 0.75 and not dead_without[live].any()
    assert dead_with_auxk[dead].float().mean() <= 0.15
    assert not dead_with_auxk[live].any()
    # The revived latents explain the half of the dictionary the live ones cannot.
    assert fvu_with_auxk < 0.5 * fvu_without  # measured: 0.06 to 0.08 vs 0.24 to 0.30


def test_trainer_counts_tokens_since_fired():
    cfg = SAEConfig(d_in=8, expansion_factor=4, k=4, dead_after_tokens=100)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc[:3] = -1e4  # these three can never fire
    trainer = SAETrainer(sae, lr=1e-4)
    for _ in range(3):
        metrics = trainer.step(torch.randn(40, cfg.d_in))
    assert metrics["tokens"] == 120.0
    assert (trainer.num_tokens_since_fired[:3] == 120).all()
    assert trainer.dead_mask[:3].all()
    assert trainer.dead_fraction == pytest.approx(float(trainer.dead_mask.float().mean()))
    assert metrics["dead_fraction"] == trainer.dead_fraction


# --- training end to end ----------------------------------------------------------------------------


def test_train_sae_recovers_planted_dictionary(caplog: pytest.LogCaptureFixture):
    generator = torch.Generator().manual_seed(1)
    atoms = planted_dictionary(128, 64, generator)
    cfg = SAEConfig(d_in=64, expansion_factor=4, k=4)
    batches = (sparse_samples(atoms, 256, active=4, generator=generator) for _ in range(400))
    with caplog.at_level(logging.INFO, logger="curation.sae.model"):
        sae, summary = train_sae(batches, cfg, log_every=100, normalizer_tokens=2048, lr=1e-2)
    assert summary["steps"] == 400 and summary["tokens"] == 400 * 256
    assert summary["fvu"] < 0.1  # measured over 6 seeds: 0.04 to 0.05
    assert summary["tokens_per_s"] > 0 and 0.0 <= summary["dead_fraction"] <= 1.0
    with torch.no_grad():
        held_out = sparse_samples(atoms, 4096, active=4, generator=generator)
        assert sae(held_out).fvu.item() < 0.1
        # Nearly every planted atom has a decoder row pointing along it.
        best_cosine = (atoms @ sae.W_dec.T).max(dim=1).values
    assert (best_cosine > 0.9).float().mean() >= 0.9  # measured over 6 seeds: 0.97 to 1.0
    assert any("fvu=" in record.getMessage() for record in caplog.records)


def test_train_sae_fits_normalizer_on_leading_rows_and_stops_at_max_tokens():
    rows = [torch.randn(100, 8) * (i + 1) + i for i in range(20)]
    cfg = SAEConfig(d_in=8, expansion_factor=2, k=2)
    sae, summary = train_sae(iter(rows), cfg, max_tokens=1050, normalizer_tokens=250, log_every=5)
    first = torch.cat(rows[:3])  # 300 rows: the first batches reaching >= 250
    torch.testing.assert_close(sae.input_mean, first.mean(dim=0))
    assert (summary["tokens"], summary["steps"]) == (1050, 11)
    with pytest.raises(ValueError, match="d_in=8"):
        train_sae([torch.randn(2, 5, 8)], cfg)


# --- save / load ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = SAEConfig(
        d_in=6,
        expansion_factor=4,
        k=3,
        layer=8,
        coords=[5, 1, 40, 7, 2, 99],
        coord_selector="jacobian",
        base_model={"name": "tiny-llama", "hidden_size": 128, "num_layers": 4, "fingerprint": "abc123"},
    )
    sae = TopKSAE(cfg)
    x = 2.0 + 3.0 * torch.randn(64, cfg.d_in)
    sae.fit_normalizer(x)
    SAETrainer(sae, lr=1e-2).step(x)  # weights differ from any fresh init
    directory = tmp_path / "nested" / "sae"
    sae.save(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert json.loads((directory / "cfg.json").read_text())["coords"] == cfg.coords
    assert {"input_mean", "input_scale", "W_enc", "b_enc", "W_dec", "b_dec"} == set(
        load_file(directory / "sae.safetensors")
    )

    def no_pickle(*args, **kwargs):
        raise AssertionError("load must not use torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = TopKSAE.load(str(directory))
    assert loaded.cfg == cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        acts, indices = sae.encode(x)
        loaded_acts, loaded_indices = loaded.encode(x)
    assert torch.equal(acts, loaded_acts) and torch.equal(indices, loaded_indices)


def test_attention_sinks_neither_set_the_scale_nor_train():
    """A few tokens 200x the median norm (SmolLM2's sinks past position 0) would carry most of the sample's
    squared norm: the normaliser leaves them out, records the limit, and training drops them."""
    generator = torch.Generator().manual_seed(0)
    ordinary = torch.randn(4096, 16, generator=generator)
    sinks = torch.zeros(4, 16)
    sinks[:, 3] = 200 * ordinary.norm(dim=1).median()
    mixed = torch.cat([ordinary[:2000], sinks, ordinary[2000:]])
    clean, dirty = TopKSAE(SAEConfig(d_in=16, k=4)), TopKSAE(SAEConfig(d_in=16, k=4))
    clean.fit_normalizer(ordinary)
    dirty.fit_normalizer(mixed)
    assert dirty.input_scale.item() == pytest.approx(clean.input_scale.item(), rel=0.01)
    assert 5 * ordinary.norm(dim=1).max() < dirty.cfg.max_input_norm < sinks[0].norm()
    assert dirty.keep(mixed).sum() == len(ordinary) and not dirty.keep(sinks).any()
    _, summary = train_sae([mixed[i : i + 512] for i in range(0, len(mixed), 512)], SAEConfig(d_in=16, k=4))
    assert summary["sink_tokens"] == 4 and summary["tokens"] == len(ordinary)


# --- divergence ---------------------------------------------------------------------------------------------


def test_training_stops_when_the_loss_goes_non_finite():
    """A learning rate of 1e9 used to finish with fvu nan and an SAE that encodes every document as zeros."""
    from curation.sae.model import TrainingDiverged

    rows = [torch.randn(64, 8) for _ in range(20)]
    with pytest.raises(TrainingDiverged, match="learning rate 1e\\+09"):
        train_sae(iter(rows), SAEConfig(d_in=8, expansion_factor=2, k=2), normalizer_tokens=64, lr=1e9)


def test_an_sae_with_non_finite_weights_does_not_load(tmp_path: Path):
    from curation.sae.model import TrainingDiverged

    sae = TopKSAE(SAEConfig(d_in=4, expansion_factor=2, k=2))
    sae.fit_normalizer(torch.randn(16, 4))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    sae.save(tmp_path / "sae")
    with pytest.raises(TrainingDiverged, match="W_dec"):
        TopKSAE.load(tmp_path / "sae")
