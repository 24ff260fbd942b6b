"""Helpers shared by test files: small corpora with planted documents, a Ray head for job submission, job
environments, planted MMLU questions."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO, free_port

SEEDS = [
    {"domain": "maths", "text": "prime numbers and integers and the proof of a theorem"},
    {"domain": "maths", "text": "w10 w11 w12 w13 w14 w15 integers proof"},
    {"domain": "body", "text": "the heart pumps blood and cells divide in the body"},
    {"domain": "body", "text": "w40 w41 w42 w43 w44 w45 heart blood"},
]


def planted(seed_text: str, variant: int) -> str:
    """A document made to resemble a seed: the seed's words with one neutral word appended."""
    return f"{seed_text} w{150 + variant}"


def background(rng: random.Random) -> str:
    """A document unlike every seed: random words from a range no seed uses."""
    return " ".join(f"w{rng.randrange(60, 140)}" for _ in range(rng.randrange(6, 30)))


def write_corpus(root: Path, shards: int = 3, background_docs: int = 60, bad_rows: bool = True) -> dict:
    """Gzipped JSONL shards: background docs, two planted docs per seed, and (optionally) bad rows.

    Returns {"planted": {text: domain}, "seeds": path of the seeds file, "good_rows": count, "bad": {reason: n}}.
    """
    rng = random.Random(7)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[bytes] = []
    planted_texts: dict[str, str] = {}
    for index, seed in enumerate(SEEDS):
        for variant in range(2):
            text = planted(seed["text"], 2 * index + variant)
            planted_texts[text] = seed["domain"]
            rows.append(json.dumps({"text": text, "meta": {"kind": "planted"}}).encode())
    for _ in range(background_docs):
        rows.append(json.dumps({"text": background(rng), "meta": {"kind": "background"}}).encode())
    rng.shuffle(rows)
    bad = {}
    if bad_rows:
        rows += [b"{not json", json.dumps({"meta": {}}).encode(), json.dumps({"text": "  "}).encode()]
        bad = {"bad_json": 1, "missing_text": 1, "empty": 1}
    for shard in range(shards):
        payload = b"".join(row + b"\n" for row in rows[shard::shards])
        (root / f"part-{shard}.jsonl.gz").write_bytes(gzip.compress(payload))
    seeds_path = root.parent / "seeds.jsonl"
    seeds_path.write_text("".join(json.dumps(seed) + "\n" for seed in SEEDS))
    good = len(rows) - sum(bad.values())
    return {"planted": planted_texts, "seeds": str(seeds_path), "good_rows": good, "bad": bad}


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("Ray dashboard did not come up")


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[str]:
    """A real `ray start --head` cluster for the duration of the block; yields its job-submission address."""
    with ray_cluster(env, num_cpus) as cluster:
        yield cluster["dashboard"]


@contextlib.contextmanager
def ray_cluster(env: dict[str, str], num_cpus: int = 2, worker_gpus: int = 0) -> Iterator[dict[str, str]]:
    """A real cluster of `ray start` processes for the duration of the block: a head with `num_cpus` CPUs and
    no GPU, and with `worker_gpus` > 0 a second node with as many CPUs advertising that many GPUs (Ray only
    counts them; workers given one run on the CPU under FINESCOPE_FORCE_CPU). Yields the job-submission
    address (`dashboard`), the address a driver joins (`gcs`) and, with a worker node, its id (`gpu_node`).
    """
    dashboard_port, gcs_port = free_port(), free_port()
    # Ray's socket paths must stay under the 107-byte Unix limit, which pytest's tmp_path can exceed.
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = str(Path(sys.executable).parent / "ray")
    # The agent gets its own port: the default, 52365, is taken by any other Ray on this machine (such as
    # the test session's), and an agent that cannot bind it never registers, so no job could be submitted.
    nodes = [subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={ray_temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )]  # fmt: skip
    cluster = {"dashboard": f"http://127.0.0.1:{dashboard_port}", "gcs": f"127.0.0.1:{gcs_port}"}
    try:
        _wait_for_dashboard(cluster["dashboard"], nodes[0])
        if worker_gpus:
            nodes.append(subprocess.Popen(
                [ray_bin, "start", "--block", f"--address={cluster['gcs']}", f"--num-cpus={num_cpus}",
                 f"--num-gpus={worker_gpus}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--metrics-export-port={free_port()}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
            cluster["gpu_node"] = _wait_for_gpu_node(cluster["dashboard"], nodes[1])
        yield cluster
    finally:
        # Each node and everything it started share one process group: end them all, not just `ray start`.
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=15)
        shutil.rmtree(ray_temp, ignore_errors=True)


def _wait_for_gpu_node(dashboard: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the alive node advertising GPUs, once the head has registered it."""
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start (worker node) exited with {proc.returncode}")
        try:
            nodes = list_nodes(address=dashboard, timeout=10)
        except Exception:  # the state API answers only once the head is fully up
            nodes = []
        for node in nodes:
            if node.state == "ALIVE" and node.resources_total.get("GPU", 0) > 0:
                return node.node_id
        time.sleep(1)
    raise RuntimeError("the GPU worker node did not register with the head")


def submit_job(
    address: str, module_args: list[str], env: dict[str, str], timeout: int = 400
) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m MODULE ARGS...`, waiting for the job to end."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    for _ in range(12):
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--", sys.executable, "-m", *module_args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        # The dashboard answers before the head's job agent has registered; Ray says to try again.
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            break
        time.sleep(5)
    return submit


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


GPU_STAGES = ("sae", "curate", "prune", "distill", "finetune", "evaluate")
PLANTED_ANSWER = "w7 w8"
DISTRACTORS = ["w1 w2", "w3", "w4 w5 w6"]


def planted_questions(count: int = 12) -> list[dict]:
    """Questions whose right answer is always `w7 w8`, placed at every letter in turn."""
    rows = []
    for index in range(count):
        choices = list(DISTRACTORS)
        choices.insert(index % 4, PLANTED_ANSWER)
        rows.append({"question": f"w{20 + index} w{40 + index} w{60 + index}", "answer_a": choices[0],
                     "answer_b": choices[1], "answer_c": choices[2], "answer_d": choices[3],
                     "correct_answer": "ABCD"[index % 4], "topic": "abstract algebra"})  # fmt: skip
    return rows


def gpu_settings() -> dict[str, dict]:
    """Every GPU setting of the shipped GPU pipeline, by stage; the transformers teacher asks for one too
    (the shipped vLLM teacher's engines ask for theirs through vLLM)."""
    import yaml

    shipped = yaml.safe_load((REPO / "jobs" / "configs" / "pipeline-s3.yaml").read_text())
    settings = {
        stage: {key: value for key, value in shipped.get(stage, {}).items() if "gpu" in key or key == "zero_stage"}
        for stage in GPU_STAGES
    }
    settings["distill"]["gpus"] = 1
    return settings


def write_spec(root: Path, tiny_model_dir: str, corpus: dict, glob: str, top: dict | None = None, **changes) -> Path:
    """A pipeline spec for the tiny model and corpus; `top` replaces top-level values (`root`, `seeds`: paths
    on S3, say), `changes` set `stage__key` values."""
    import yaml

    from training.evaluation import mmlu

    mmlu_file = root / "mmlu.jsonl"
    if not mmlu_file.exists():
        rows = planted_questions(8 + mmlu.DEV_PER_SUBJECT)
        mmlu_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "root": str(root / "run"),
        "model": tiny_model_dir,
        "corpus": [glob],
        "seeds": corpus["seeds"],
        "domains": {"maths": {"mmlu": ["all"]}},
        "ratios": [0.3],
        "sae": {"layer": 2, "coords": "jacobian", "num_coords": 32, "expansion_factor": 4, "k": 8,
                "max_train_tokens": 1500, "epochs": 3, "batch_tokens": 256, "cpus": 0.5},
        "curate": {"top_n": 2, "cpus": 0.5, "batch_size": 16},
        "prune": {"channel_multiple": 8, "max_tokens": 32},
        "distill": {"max_new_tokens": 4, "min_document_tokens": 4, "batch_size": 2, "part_rows": 2,
                    "cpus": 0.5, "threads": 1},
        "finetune": {"epochs": 3, "micro_batch": 1, "max_tokens": 32, "warmup_steps": 1, "checkpoint_every": 2,
                     "log_every": 1, "cpus": 0.5, "threads": 1},
        "evaluate": {"mmlu_file": str(mmlu_file), "window": 16, "stride": 8, "threads": 1},
    }  # fmt: skip
    spec.update(top or {})
    for dotted, value in changes.items():
        stage, key = dotted.split("__")
        spec[stage][key] = value
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
