"""One model reference for every stage: embedded names, local directories, .gguf files, Hub ids (from a Hub
cache built here, offline) and s3:// prefixes (on moto's S3 server), resolved without reading weights on the
driver and copied once per machine in the worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port

from core import models, storage
from core.errors import ConfigError
from core.models import ModelRef, load_model, load_tokenizer, local_model_dir, model_config, model_info, model_inputs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread (see conftest.one_torch_thread)."""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A FineScope cache of this test's own."""
    root = tmp_path / "finescope-cache"
    monkeypatch.setenv("FINESCOPE_CACHE", str(root))
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A Hub cache laid out as huggingface_hub writes one, holding `org/tiny` at COMMIT (main and tag v1)."""
    root = tmp_path / "hub"
    repo = root / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def upload(directory: str, uri: str) -> None:
    storage.upload_dir(directory, uri)


def put(bucket: str, key: str, body: bytes) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)  # boto3 keeps `..` in a key as it is


def files_under(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


# --- parsing ----------------------------------------------------------------------------------------------


def test_every_form_parses_to_its_kind(tiny_model_dir, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cases = {
        "smollm2-135m": ("embedded", "smollm2-135m", None),
        tiny_model_dir: ("directory", str(Path(tiny_model_dir).resolve()), None),
        str(gguf): ("gguf", str(gguf.resolve()), None),
        "HuggingFaceTB/SmolLM2-135M": ("hub", "HuggingFaceTB/SmolLM2-135M", None),
        "org/name@v1.0": ("hub", "org/name", "v1.0"),
        "org/name@refs/pr/1": ("hub", "org/name", "refs/pr/1"),
        "s3://bucket/models/base/": ("s3", "s3://bucket/models/base", None),
    }
    for text, (kind, location, revision) in cases.items():
        ref = ModelRef.parse(text)
        assert (ref.kind, ref.location, ref.revision) == (kind, location, revision), text
        assert ModelRef.parse(ref.canonical) == ModelRef(ref.canonical, kind, location, revision)


def test_a_relative_directory_becomes_absolute_for_workers(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    ref = ModelRef.parse(Path(tiny_model_dir).name)
    assert ref.kind == "directory" and ref.canonical == str(Path(tiny_model_dir).resolve())


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("no-such-model", "Hub id (org/name"),
        ("./runs/missing", "no such file or directory"),
        ("gs://bucket/model", "not a model location"),
        ("s3://bucket/model.gguf", "local path"),
        ("org/name@", "no such file"),
        ("", "is required"),
    ],
)
def test_a_reference_of_no_form_names_the_forms(text, says):
    with pytest.raises(ConfigError) as error:
        ModelRef.parse(text, field="teacher")
    assert error.value.field == "teacher" and says in str(error.value)
    assert "s3://" in error.value.fix or "local path" in error.value.fix


# --- Hub ids ----------------------------------------------------------------------------------------------


def test_a_hub_id_resolves_from_the_hub_cache_offline(hub_cache):
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    for text in ("org/tiny", "org/tiny@v1", f"org/tiny@{COMMIT}"):
        info = model_info(text)
        assert (info.name, info.num_layers, info.hidden_size, info.model_type) == (text, 4, 64, "llama")
        assert Path(local_model_dir(text)) == snapshot
        assert model_inputs(text)[0].uri == f"hf://org/tiny@{COMMIT}"
    assert model_config("org/tiny")["num_key_value_heads"] == 2
    model = load_model("org/tiny")
    assert model.config.num_hidden_layers == 4 and load_tokenizer("org/tiny").pad_token == "<pad>"


def test_a_hub_id_missing_offline_names_hf_hub_offline_and_the_download_command(hub_cache):
    for text, command in [
        ("org/absent", "`hf download org/absent`"),
        ("org/absent@v2", "`hf download org/absent --revision v2`"),
        ("org/tiny@v9", "`hf download org/tiny --revision v9`"),
    ]:
        with pytest.raises(ConfigError) as error:
            model_info(text, field="teacher")
        assert error.value.field == "teacher" and error.value.value == text
        assert "HF_HUB_OFFLINE" in error.value.fix and command in error.value.fix


def test_a_hub_cache_with_config_but_no_weights_asks_for_the_download(hub_cache):
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()
    assert model_info("org/tiny").num_layers == 4  # validation needs config.json only
    with pytest.raises(ConfigError, match="hf download org/tiny"):
        local_model_dir("org/tiny")


# --- S3 prefixes ------------------------------------------------------------------------------------------


def test_an_s3_model_is_validated_from_its_config_and_copied_once(s3_bucket, tiny_model_dir, cache, monkeypatch):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    copies = []
    real_copy = storage.local_copy
    monkeypatch.setattr(storage, "local_copy", lambda *a, **k: copies.append(a[0]) or real_copy(*a, **k))

    assert model_info(uri).num_layers == 4 and model_config(uri)["hidden_size"] == 64
    inputs = model_inputs(uri)
    assert sorted(info.uri.rsplit("/", 1)[1] for info in inputs) == files_under(Path(tiny_model_dir))
    assert copies == []  # validation copies nothing: it lists the prefix and reads config.json

    directory = Path(local_model_dir(uri))
    assert directory.parent == cache / "models"
    assert files_under(directory) == sorted([*files_under(Path(tiny_model_dir)), models.SOURCE_FILE])
    assert Path(local_model_dir(uri)) == directory and copies == [uri]  # the second call finds the copy
    model = load_model(uri)
    assert torch.equal(model.model.embed_tokens.weight, load_model(tiny_model_dir).model.embed_tokens.weight)


def test_a_tokenizer_from_s3_copies_no_weights(s3_bucket, tiny_model_dir, cache):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    tokenizer = load_tokenizer(uri)
    assert tokenizer("w1 w2")["input_ids"] == load_tokenizer(tiny_model_dir)("w1 w2")["input_ids"]
    (copy,) = [path for path in (cache / "models").iterdir() if path.is_dir()]
    assert copy.name.endswith("-tokenizer") and not list(copy.glob("*.safetensors"))
    full = Path(local_model_dir(uri))
    assert full != copy and list(full.glob("*.safetensors"))
    assert Path(local_model_dir(uri, weights=False)) == full  # the full copy serves the tokenizer too


def test_a_changed_s3_object_set_gives_a_new_copy_and_a_new_identity(s3_bucket, tiny_model_dir, cache, tmp_path):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    first, first_inputs = Path(local_model_dir(uri)), model_inputs(uri)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = load_model(str(other))
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    model.save_pretrained(other)
    time.sleep(1.1)  # S3 keeps whole-second modification times
    upload(str(other), uri)

    second = Path(local_model_dir(uri))
    assert second != first and first.is_dir()
    assert model_inputs(uri) != first_inputs
    reloaded = load_model(uri)
    assert torch.equal(reloaded.model.embed_tokens.weight, load_model(tiny_model_dir).model.embed_tokens.weight + 1)


def test_concurrent_resolutions_download_once(s3_bucket, tiny_model_dir, cache, monkeypatch):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    downloads = []
    real_copy = storage.local_copy

    def slow_copy(*args, **kwargs):
        downloads.append(args[0])
        time.sleep(0.5)  # long enough for every other thread to reach the lock meanwhile
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(storage, "local_copy", slow_copy)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(local_model_dir(uri))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4 and len(set(results)) == 1
    assert downloads == [uri]
    assert [path.name for path in (cache / "models").iterdir() if path.name.startswith(".")] == []


def test_concurrent_processes_download_once(s3_bucket, tiny_model_dir, cache):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from core.models import local_model_dir; print('DIR', local_model_dir(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, uri], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    dirs = {line for out in outputs for line in out.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    assert sum(out.count(f"copied {uri}") for out in outputs) == 1


def test_a_key_outside_the_copy_is_refused(s3_bucket, tiny_model_dir, cache, tmp_path):
    uri = f"s3://{s3_bucket}/models/base"
    upload(tiny_model_dir, uri)
    victim = tmp_path / "victim"
    victim.mkdir()
    bad_key = f"models/base/../../../../../../../..{victim}/PLANTED.txt"
    put(s3_bucket, bad_key, b"planted")
    for resolve in (model_info, model_inputs, local_model_dir):
        with pytest.raises(ConfigError) as error:
            resolve(uri)
        assert error.value.field == "model" and bad_key in error.value.fix
    assert list(victim.iterdir()) == []
    assert not (cache / "models").exists() or [p for p in (cache / "models").iterdir() if p.is_dir()] == []


def test_a_prefix_without_config_or_objects_names_the_problem(s3_bucket):
    put(s3_bucket, "loose/weights.safetensors", b"x")
    with pytest.raises(ConfigError, match="no config.json"):
        model_info(f"s3://{s3_bucket}/loose")
    with pytest.raises(ConfigError, match="no object under this prefix"):
        model_info(f"s3://{s3_bucket}/nothing-here")


def test_s3_endpoint_and_bucket_failures_are_config_errors(s3_bucket, tiny_model_dir):
    upload(tiny_model_dir, f"s3://{s3_bucket}/m")
    closed = storage.StorageOptions(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError) as error:
        model_info(f"s3://{s3_bucket}/m", closed, field="teacher")
    assert error.value.field == "teacher" and "--s3-endpoint" in error.value.fix and "cannot reach" in error.value.fix
    with pytest.raises(ConfigError) as error:
        model_info("s3://no-such-bucket-finescope/m")
    assert "does not exist" in error.value.fix and "--s3-endpoint" in error.value.fix


def test_missing_s3_credentials_are_a_config_error(s3_bucket, tiny_model_dir, tmp_path, monkeypatch):
    import s3fs

    upload(tiny_model_dir, f"s3://{s3_bucket}/m")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep the credentials it found
    try:
        with pytest.raises(ConfigError) as error:
            model_info(f"s3://{s3_bucket}/m")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "no S3 credentials" in error.value.fix and "AWS_ACCESS_KEY_ID" in error.value.fix


def test_refused_s3_credentials_are_a_config_error(tmp_path):
    """A store that checks credentials (moto with authentication on) answers 403 to unknown keys."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        options = storage.StorageOptions(endpoint_url=f"http://127.0.0.1:{port}")
        deadline = time.time() + 30
        while True:
            try:
                model_info("s3://locked/m", options)
            except ConfigError as error:
                if "cannot reach" in error.fix and time.time() < deadline:
                    time.sleep(0.2)  # the server is still starting
                    continue
                assert "403" in error.fix and "AWS_SECRET_ACCESS_KEY" in error.fix, error.fix
                break
    finally:
        server.terminate()
        server.wait(timeout=10)


# --- the stages' plans identify the model by its object set ---------------------------------------------------


def test_every_form_has_an_identity_that_follows_its_content(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = model_inputs(str(copy))
    assert sorted(Path(info.uri).name for info in before) == files_under(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("4", "4 ", 1))
    assert model_inputs(str(copy)) != before
