"""SAE training's epochs: the streamed activations once as they come, then replayed in shuffled order.

The replays read the activations back from a file on local disk, not from memory. Held in memory, they
made the trainer grow with the token budget (budget x coordinates x 4 bytes: 920 MB at the default 400k
tokens on SmolLM2's 576 coordinates, 115 GB at 50M), and a budget sized for a corpus would not fit. On
disk, the trainer holds one batch whatever the budget, and the file's pages sit in the page cache, which
the kernel hands back under pressure. The replayed batches are the very rows the in-memory replay drew.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from core.progress import Progress


class ActivationSpill:
    """An append-only (rows, width) float32 file in a fresh temporary directory, removed by `close`."""

    def __init__(self, directory: str | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="finescope-sae-replay-", dir=directory)
        self.path = os.path.join(self._dir.name, "activations.f32")
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close(), which the caller owns)
        self.rows = 0
        self.width: int | None = None

    def append(self, batch: torch.Tensor) -> None:
        if self.width is None:
            self.width = batch.shape[1]
        elif batch.shape[1] != self.width:
            raise ValueError(f"a batch of width {batch.shape[1]} after batches of width {self.width}")
        self._file.write(batch.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.rows += batch.shape[0]

    def read(self) -> np.ndarray:
        """The rows written so far, as a read-only memory map (no copy: rows load as they are indexed)."""
        self._file.flush()
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.width or 0))

    def close(self) -> None:
        self._file.close()
        self._dir.cleanup()


def replay_batches(
    stream: Iterator[torch.Tensor],
    epochs: int,
    batch_tokens: int,
    seed: int = 0,
    progress: Progress | None = None,
    spill_dir: str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the stream's batches; with epochs > 1, also append them to an `ActivationSpill` in `spill_dir`
    (None: the system's temporary directory) and replay them, each epoch in an order drawn by a generator
    seeded with `seed`. `progress` counts the tokens yielded (one SAE step per batch); once the stream ends,
    its total becomes what the stream held times `epochs`."""
    generator = torch.Generator().manual_seed(seed)
    progress = progress or Progress("sae train", unit="tokens", enabled=False)
    spill = ActivationSpill(spill_dir) if epochs > 1 else None
    streamed = steps = 0
    try:
        for batch in stream:
            if spill is not None:
                spill.append(batch)
            streamed, steps = streamed + batch.shape[0], steps + 1
            progress.add(batch.shape[0], note=f"step {steps:,}")
            yield batch
        progress.total = streamed * epochs  # exact now: a corpus smaller than the budget ends the stream early
        if spill is None or spill.rows == 0:
            return
        kept = spill.read()
        for _ in range(epochs - 1):
            order = torch.randperm(kept.shape[0], generator=generator).numpy()
            for start in range(0, kept.shape[0], batch_tokens):
                steps += 1
                progress.add(min(batch_tokens, kept.shape[0] - start), note=f"step {steps:,}")
                yield torch.from_numpy(np.asarray(kept[order[start : start + batch_tokens]]))
    finally:
        if spill is not None:
            spill.close()
