"""Cluster manifests: they parse, hold the fields their controllers require, and run existing jobs with valid flags."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import pipeline
from core import cli
from curation.sae.train import TrainSAEConfig
from curation.schedule.service import ScheduleJobConfig
from curation.schedule.spec import load_schedule_spec
from curation.selection.curate import CurateConfig

CLUSTER = REPO / "cluster"
JOB_CONFIGS = {
    "jobs.schedule": ScheduleJobConfig,
    "jobs.curate": CurateConfig,
    "jobs.train_sae": TrainSAEConfig,
    "jobs.pipeline": pipeline.PipelineJobConfig,
}


def manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def job_commands(argv: list[str]) -> list[list[str]]:
    """Every `python -m jobs.<name> ...` inside a command line, as its argument list from the module on
    (up to the next `python`, `&&` or `;`)."""
    found = []
    for index in range(len(argv) - 1):
        if argv[index] == "-m" and argv[index + 1].startswith("jobs."):
            rest = argv[index + 1 :]
            end = next((i for i, token in enumerate(rest) if token in ("python", "&&", ";")), len(rest))
            found.append(rest[:end])
    return found


def check_job_command(argv: list[str]) -> None:
    """The module exists, its config accepts the flags, and a --spec file loads."""
    module, args = argv[0], argv[1:]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    config = cli.parse(JOB_CONFIGS[module], args)
    if module == "jobs.pipeline":  # every stage's config of the spec builds
        steps = pipeline.build_steps(pipeline.load_spec(str(REPO / config.spec)))
        assert {step.stage for step in steps} >= {"curate", "prune", "distill", "finetune", "evaluate"}
        return
    for spec in getattr(config, "spec", []):
        loaded = load_schedule_spec(str(REPO / spec))
        assert loaded.corpus and loaded.out


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["headGroupSpec"]["rayStartParams"] is not None
    assert containers(spec["headGroupSpec"]["template"])[0]["image"]
    groups = spec["workerGroupSpecs"]
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu") for group in groups for c in containers(group["template"])
    ]
    assert any(gpu_limits), "a worker group must ask for GPUs"
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_cluster_file_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "raycluster.yaml", "rayjob-schedule.yaml", "cronjob-schedule.yaml", "ray-cluster-launcher.yaml",
        "rayjob-pipeline.yaml", "runtime-env.yaml",
    }  # fmt: skip
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_rayjob_runs_one_schedule_batch():
    job = manifest("rayjob-schedule.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    commands = job_commands(shlex.split(job["spec"]["entrypoint"]))
    assert commands and commands[0][0] == "jobs.schedule" and "--once" in commands[0]
    for command in commands:
        check_job_command(command)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


def test_rayjob_runs_the_pipeline_on_cpu_and_gpu_groups():
    job = manifest("rayjob-pipeline.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    commands = job_commands(shlex.split(job["spec"]["entrypoint"]))
    assert [command[0] for command in commands] == ["jobs.pipeline"]
    check_job_command(commands[0])
    spec = job["spec"]["rayClusterSpec"]
    check_ray_cluster_spec(spec)
    gpus = {g["groupName"]: containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu") for g in
            spec["workerGroupSpecs"]}  # fmt: skip
    assert gpus == {"cpu": None, "gpu": "1"}
    loaded = pipeline.load_spec(str(REPO / "jobs" / "configs" / "pipeline-s3.yaml"))
    assert loaded.root.startswith("s3://") and loaded.backend == "vllm"


def test_runtime_env_installs_the_pinned_dependencies():
    import tomllib

    env = manifest("runtime-env.yaml")
    assert env["working_dir"] == "." and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # Ray itself is on the cluster already; every other pin must match pyproject.toml exactly.
    assert sorted(env["pip"]["packages"]) == sorted(d for d in declared if not d.startswith("ray["))


def test_cronjob_submits_a_batch_to_the_raycluster():
    cron = manifest("cronjob-schedule.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure")
    argv = containers(pod)[0]["command"]
    assert argv[:3] == ["ray", "job", "submit"]
    # The address is the head service KubeRay creates for the RayCluster of raycluster.yaml.
    cluster = manifest("raycluster.yaml")
    assert f"http://{cluster['metadata']['name']}-head-svc:8265" == argv[argv.index("--address") + 1]
    commands = job_commands(argv)
    assert commands and commands[0][0] == "jobs.schedule" and "--once" in commands[0]
    for command in commands:
        check_job_command(command)


def test_raycluster_has_an_autoscaled_gpu_group():
    cluster = manifest("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_ray_cluster_spec(cluster["spec"])


def test_launcher_has_gpu_workers_and_valid_commands():
    launcher = manifest("ray-cluster-launcher.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in launcher, key
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert any(node["resources"].get("GPU", 0) >= 1 and node.get("max_workers", 0) > 0 for node in types.values())
    assert any(not node["resources"].get("GPU") and node["resources"].get("CPU", 0) > 0 for node in types.values())
    header = [line.lstrip("# ") for line in (CLUSTER / "ray-cluster-launcher.yaml").read_text().splitlines()]
    commands = job_commands(shlex.split(" ".join(line.rstrip("\\") for line in header if line.startswith("python"))))
    assert {command[0] for command in commands} == {"jobs.pipeline", "jobs.schedule"}
    for command in commands:
        check_job_command(command)


@pytest.mark.parametrize("bad", [["--spec", "jobs/configs/schedule-s3.yaml", "--no-such-flag"]])
def test_a_wrong_flag_would_be_caught(bad):
    with pytest.raises(SystemExit):
        check_job_command(["jobs.schedule", *bad])


def test_shipped_schedule_specs_load():
    for path in sorted((REPO / "jobs" / "configs").glob("schedule-*.yaml")):
        spec = load_schedule_spec(str(path))
        assert spec.rule in ("per_seed_topn", "global_topn", "threshold") and spec.max_attempts >= 1, path
    cluster_spec = load_schedule_spec(str(REPO / "jobs" / "configs" / "schedule-s3.yaml"))
    assert cluster_spec.gpus == 1 and cluster_spec.out.startswith("s3://")
    assert Path(REPO / "jobs" / "schedule.py").is_file()


def documented_commands() -> list[list[str]]:
    """Every complete `python -m jobs.<name> ...` command in the bash blocks of README.md and of every
    docs/*.md page (those with `...` placeholders left out), continuation lines joined."""
    commands = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in page.read_text().split("```bash")[1:]:
            body = block.split("```")[0].replace("\\\n", " ")
            for line in body.splitlines():
                line = line.split("  #")[0]
                if "python -m jobs." in line and "..." not in line:
                    commands += job_commands(shlex.split(line))
    return commands


def test_documented_job_commands_parse():
    """The commands of the README and docs/ use flags the jobs accept, and the spec files they name load;
    together they run every stage's job."""
    from curation.selection.reselect import ReselectConfig
    from curation.split import SplitConfig
    from experiments.replication import ReplicationJobConfig, build_replication, load_replication_spec
    from jobs.make_demo_corpus import DemoCorpusConfig
    from training.distillation.distill import DistillConfig
    from training.evaluation.evaluate import EvaluateConfig
    from training.finetuning.finetune import FinetuneConfig
    from training.pruning.prune import PruneConfig

    configs = {**JOB_CONFIGS, "jobs.split": SplitConfig, "jobs.prune": PruneConfig, "jobs.distill": DistillConfig,
               "jobs.finetune": FinetuneConfig, "jobs.evaluate": EvaluateConfig,
               "jobs.make_demo_corpus": DemoCorpusConfig, "jobs.replicate": ReplicationJobConfig,
               "jobs.select": ReselectConfig}  # fmt: skip
    commands = documented_commands()
    assert {command[0] for command in commands} >= {
        "jobs.train_sae", "jobs.curate", "jobs.split", "jobs.prune", "jobs.distill", "jobs.finetune",
        "jobs.evaluate", "jobs.schedule", "jobs.pipeline", "jobs.replicate", "jobs.select",
    }  # fmt: skip
    for command in commands:
        module, args = command[0], command[1:]
        config = cli.parse(configs[module], args)
        spec = getattr(config, "spec", None)
        if module == "jobs.pipeline" and (REPO / spec).is_file():
            pipeline.build_steps(pipeline.load_spec(str(REPO / spec)))
        if module == "jobs.replicate":
            build_replication(load_replication_spec(str(REPO / spec)))


# ---------------------------------------------------------------- job API authentication

TOKEN_SECRET = "finescope-ray-token"


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env") or []}


def token_env_problems(container: dict, where: str) -> list[str]:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN read from a Kubernetes Secret, never written in the manifest."""
    env = env_of(container)
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is {env.get('RAY_AUTH_MODE', {}).get('value')!r}, not 'token'")
    token = env.get("RAY_AUTH_TOKEN", {})
    if "value" in token or not token.get("valueFrom", {}).get("secretKeyRef", {}).get("name"):
        problems.append(f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)")
    return problems


def kuberay_problems(spec: dict, where: str) -> list[str]:
    """A KubeRay cluster's dashboard (the job API) listens on the pod network for the head Service, so every
    Ray container must enforce the token (or KubeRay's authOptions must turn it on for all of them)."""
    if (spec.get("authOptions") or {}).get("mode") == "token":
        return []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [
        problem
        for name, group in groups
        for container in containers(group["template"])
        for problem in token_env_problems(container, f"{where} {name}/{container['name']}")
    ]


def launcher_problems(launcher: dict, where: str) -> list[str]:
    """`ray up`: every node starts Ray in token mode with the token file, and the dashboard stays on loopback
    (reached through `ray dashboard`'s SSH tunnel)."""
    problems = []
    commands = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    starts = [command for command in commands if "ray start" in command]
    for command in starts:
        if "RAY_AUTH_MODE=token" not in command:
            problems.append(f"{where}: `{command}` starts Ray without RAY_AUTH_MODE=token")
        if "dashboard-host" in command and "dashboard-host=127.0.0.1" not in command:
            problems.append(f"{where}: `{command}` binds the dashboard beyond loopback")
    if not any(target.endswith(".ray/auth_token") for target in launcher.get("file_mounts", {})):
        problems.append(f"{where}: no node receives the token file (~/.ray/auth_token)")
    return problems


def auth_problems(name: str, document: dict) -> list[str]:
    """Everything that would leave a job API of the manifest open."""
    text = yaml.safe_dump(document)
    problems = [f"{name}: RAY_AUTH_MODE=disabled"] if "disabled" in text and "RAY_AUTH_MODE" in text else []
    kind = document.get("kind")
    if kind == "RayCluster":
        problems += kuberay_problems(document["spec"], name)
    elif kind == "RayJob":
        problems += kuberay_problems(document["spec"]["rayClusterSpec"], name)
    elif kind == "CronJob":
        pod = document["spec"]["jobTemplate"]["spec"]["template"]
        for container in containers(pod):
            if container.get("command", [])[:3] == ["ray", "job", "submit"]:
                problems += token_env_problems(container, f"{name} {container['name']}")
    elif "head_start_ray_commands" in document:
        problems += launcher_problems(document, name)
    if kind in ("RayCluster", "RayJob", "CronJob") or "head_start_ray_commands" in document:
        return problems
    assert "env_vars" in document, f"{name}: a manifest this test does not know how to check"
    return problems


@pytest.mark.parametrize("name", sorted(path.name for path in CLUSTER.glob("*.yaml")))
def test_every_job_api_requires_the_token(name):
    document = manifest(name)
    assert auth_problems(name, document) == []


def test_the_cluster_secret_feeds_the_token_to_kuberay_and_the_cronjob():
    cluster, cron = manifest("raycluster.yaml"), manifest("cronjob-schedule.yaml")
    head = containers(cluster["spec"]["headGroupSpec"]["template"])[0]
    submit = containers(cron["spec"]["jobTemplate"]["spec"]["template"])[0]
    # The CronJob must present the token the RayCluster enforces: the same Secret and key.
    head_ref = env_of(head)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert env_of(submit)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == head_ref
    assert head_ref == {"name": TOKEN_SECRET, "key": "auth_token"}


@pytest.mark.parametrize(
    "name, breakage",
    [
        ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("env")),
        ("rayjob-pipeline.yaml", lambda d: d["spec"]["rayClusterSpec"].pop("authOptions")),
        ("cronjob-schedule.yaml", lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
         .update(env=[{"name": "RAY_AUTH_MODE", "value": "disabled"}])),
        ("ray-cluster-launcher.yaml", lambda d: d["head_start_ray_commands"].append(
            "ray start --head --dashboard-host=0.0.0.0")),
    ],
)  # fmt: skip
def test_the_check_catches_an_open_job_api(name, breakage):
    document = manifest(name)
    breakage(document)
    assert auth_problems(name, document)
