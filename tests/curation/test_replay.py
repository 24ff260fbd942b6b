"""SAE training's epoch replay: the same rows in the same order as an in-memory replay, held on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from curation.sae.replay import ActivationSpill, replay_batches


def rss_anon_mb() -> float:
    """This process's anonymous resident memory (heap, not file pages), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_replay_draws_the_rows_an_in_memory_replay_draws_and_removes_its_file(tmp_path: Path):
    batches = [torch.randn(7, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    replayed = list(replay_batches(iter(batches), epochs=3, batch_tokens=4, seed=9, spill_dir=str(tmp_path)))

    everything = torch.cat(batches)
    generator = torch.Generator().manual_seed(9)
    expected = list(batches)
    for _ in range(2):
        order = torch.randperm(35, generator=generator)
        expected += [everything[order[start : start + 4]] for start in range(0, 35, 4)]
    assert len(replayed) == len(expected) == 5 + 2 * 9
    for got, want in zip(replayed, expected, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    assert list(tmp_path.iterdir()) == []


def test_replay_file_is_removed_when_training_stops_early(tmp_path: Path):
    batches = iter([torch.ones(4, 2) for _ in range(3)])
    replay = replay_batches(batches, epochs=2, batch_tokens=4, spill_dir=str(tmp_path))
    next(replay)
    (spill_dir,) = tmp_path.iterdir()
    assert (spill_dir / "activations.f32").is_file()
    replay.close()
    assert list(tmp_path.iterdir()) == []


def test_one_epoch_writes_nothing(tmp_path: Path):
    batches = [torch.ones(4, 2), torch.zeros(3, 2)]
    assert [b.shape[0] for b in replay_batches(iter(batches), 1, 4, spill_dir=str(tmp_path))] == [4, 3]
    assert list(tmp_path.iterdir()) == []


def test_spill_refuses_a_batch_of_another_width(tmp_path: Path):
    spill = ActivationSpill(str(tmp_path))
    spill.append(torch.ones(2, 3))
    with pytest.raises(ValueError, match="width 4 after batches of width 3"):
        spill.append(torch.ones(2, 4))
    spill.close()


def test_replay_memory_does_not_grow_with_the_token_budget(tmp_path: Path):
    """256 MB of activations streamed and replayed: the process's own memory stays a few batches, where
    keeping them for the replay held all 256 MB (twice, while they were concatenated)."""
    rows, width, count = 1024, 1024, 64  # 4 MB a batch

    def stream():
        for i in range(count):
            yield torch.full((rows, width), float(i))

    replay = replay_batches(stream(), epochs=2, batch_tokens=rows, seed=0, spill_dir=str(tmp_path))
    first = next(replay)
    start, peak, seen, total = rss_anon_mb(), 0.0, first.shape[0], float(first.sum())
    del first
    for batch in replay:
        seen += batch.shape[0]
        total += float(batch.sum())
        del batch
        peak = max(peak, rss_anon_mb() - start)
    assert seen == 2 * rows * count
    assert total == 2 * rows * width * sum(range(count))  # every row replayed exactly once
    assert peak < 64, f"anonymous memory grew by {peak:.0f} MB over 256 MB of activations"


def test_activation_actors_hand_on_blocks_no_larger_than_the_cap(
    tmp_path: Path, tiny_model_dir, ray_local, monkeypatch
):
    """The activation stream reaches the trainer in blocks of at most `ACTIVATION_BLOCK_BYTES`, not in Ray Data's
    default 128 MiB blocks, which held back ~57k SmolLM2 tokens (over 5 minutes on 2 cores) before the first
    training step. The cap is shrunk here so that the tiny model's activations fill several blocks."""
    from helpers import write_corpus

    from core import storage
    from curation.sae import train

    write_corpus(tmp_path / "corpus", shards=1, bad_rows=False)
    cap = 16 * 1024
    monkeypatch.setattr(train, "ACTIVATION_BLOCK_BYTES", cap)
    config = train.TrainSAEConfig(corpus=[str(tmp_path / "corpus" / "*.jsonl.gz")], model=tiny_model_dir,
                                  out=str(tmp_path / "sae"), layer=2, max_train_tokens=100_000)  # fmt: skip
    dataset = train.activation_dataset(config, train._encoder_spec(config), storage.expand(config.corpus, None))
    blocks = [meta for bundle in dataset.iter_internal_ref_bundles() for meta in bundle.metadata]
    rows = sum(meta.num_rows for meta in blocks)
    width = len(train.DocumentEncoder(train._encoder_spec(config)).activations([[5, 6, 7]])[0])
    assert rows * width * 4 > 8 * cap  # the tokens of one 128-document batch: one block without the cap
    assert len(blocks) >= 8
    assert max(meta.size_bytes for meta in blocks) <= 1.5 * cap
