"""Fine-tuning checkpoints: what one holds besides DeepSpeed's state, writing it, and loading it safely.

A checkpoint's `*.pt` files are unpickled when DeepSpeed loads them; a file that would run code is refused
before anything is loaded (`CheckpointRefused`), and the load itself runs with `weights_only` unpickling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from training.finetuning.config import LoopConfig

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


@dataclass
class TrainerState:
    """Where training stands; saved next to DeepSpeed's state in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None


class CheckpointRefused(RuntimeError):
    """A checkpoint file holds something other than what DeepSpeed saves; it was not loaded."""


def _checkpoint_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its ZeRO-2/3 checkpoints besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _check_checkpoint_files(directory: str, allowed: list[Any]) -> None:
    """Refuse any `*.pt` file that is not a torch.save archive or that pickles a global outside `allowed`.

    Reads each archive's pickle opcodes without running them, so a planted payload never executes.
    """
    names = {f"{item.__module__}.{item.__qualname__}" for item in allowed}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as error:  # not a zip archive: an old-format or hand-made pickle
                raise CheckpointRefused(f"checkpoint file {path} is not a torch.save archive ({error})") from None
            if unexpected := sorted(set(found) - names):
                raise CheckpointRefused(
                    f"checkpoint file {path} pickles {unexpected}, which no DeepSpeed checkpoint holds: refusing "
                    f"to load it; delete the checkpoint (or restore a copy you trust) and rerun"
                )


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load in here (DeepSpeed passes weights_only=False) unpickles only tensors, plain
    containers and DeepSpeed's own safe classes."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_checkpoint(engine, directory: str) -> TrainerState:
    """Load a checkpoint written by `save_checkpoint` into `engine` and return its trainer state.

    Checkpoints may live on shared storage that others can write to, and DeepSpeed's own loader would
    unpickle anything. Every file is checked first and then loaded with weights_only unpickling; a file
    that holds anything else raises CheckpointRefused and nothing of it runs.
    """
    import pickle

    _check_checkpoint_files(directory, _checkpoint_safe_globals())
    with _weights_only_loads():
        try:
            engine.load_checkpoint(directory, tag=DS_TAG)
        except pickle.UnpicklingError as error:
            raise CheckpointRefused(f"checkpoint {directory} refused: {str(error).splitlines()[0]}") from None
    with open(os.path.join(directory, STATE_FILE)) as handle:
        return TrainerState(**json.load(handle))


def restore(engine, loop: LoopConfig) -> TrainerState:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainerState()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(engine, directory)
    state.resumed_from_step = state.global_step
    logger.info("resumed at step %d (epoch %d, step %d of it)", state.global_step, state.epoch, state.step_in_epoch)
    return state


def save_checkpoint(engine, state: TrainerState, metrics: dict[str, Any], rank: int) -> None:
    """Every rank saves its DeepSpeed shard; Ray Train merges the ranks' directories in storage."""
    import ray.train

    directory = tempfile.mkdtemp(prefix="finescope-ckpt-")
    try:
        engine.save_checkpoint(directory, tag=DS_TAG)
        if rank == 0:
            with open(os.path.join(directory, STATE_FILE), "w") as handle:
                json.dump(dataclasses.asdict(state), handle)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step_{state.global_step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
