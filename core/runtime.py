"""What every job shares: storage and Ray settings, and joining or starting Ray."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from core import manifest
from core.progress import INTERVAL_ENV
from core.storage import FileInfo, StorageOptions

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Settings shared by every job; stage configs inherit them.

    A stage's manifest hash, and the pipeline's step key, come from :meth:`content`: every field except
    the ones a config names in `execution_fields`, which change how a run executes (actors, threads,
    batch sizes, logging) but not what it produces. A new field is hashed unless it is listed there.
    """

    execution_fields: ClassVar[frozenset[str]] = frozenset({"s3_endpoint", "s3_region", "ray_address", "force"})
    added_fields: ClassVar[dict[str, Any]] = {}
    """Fields added after outputs were first written, each with its value that produces what the stage produced
    before: left out of `content()` at that value, so those outputs stay up to date (and their identity)."""

    s3_endpoint: str | None = None
    """S3-compatible endpoint URL; defaults to $AWS_ENDPOINT_URL. Credentials come from the standard AWS env."""
    s3_region: str | None = None
    """S3 region; defaults to $AWS_DEFAULT_REGION."""
    ray_address: str | None = None
    """Ray cluster to join. Unset: $RAY_ADDRESS (set by `ray job submit`), else a local Ray is started."""
    force: bool = False
    """Redo the stage even when a manifest for this exact config and these inputs exists."""

    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.s3_endpoint, region=self.s3_region).resolved()

    def for_workers(self):
        """This config with the endpoint and region this driver resolved, to ship to a Ray task: a worker's
        environment need not hold them (see StorageOptions.resolved; credentials never travel)."""
        options = self.storage_options()
        return dataclasses.replace(self, s3_endpoint=options.endpoint_url, s3_region=options.region)

    def content(self) -> dict[str, Any]:
        """The fields that decide what the stage produces: all but `execution_fields`, and but an `added_fields`
        field at the value that produces what the stage produced before the field existed."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.execution_fields and self.added_fields.get(k, ...) != v}  # fmt: skip

    def digest(self, inputs: Sequence[FileInfo] = (), **derived: Any) -> str:
        """The stage's manifest hash: its content, values derived from it (`derived`), and its inputs."""
        return manifest.config_hash({**self.content(), **derived}, inputs)


def init_ray(address: str | None = None) -> None:
    """Join the cluster named by `address` or $RAY_ADDRESS, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    from core.placement import PROPAGATED

    # Workers keep the driver's placement settings and progress interval (fine-tuning, evaluation lines).
    shared = {name: os.environ[name] for name in (*PROPAGATED, INTERVAL_ENV) if os.environ.get(name)}
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **shared}}
    if address:
        logger.info("joining Ray at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # address="local" always starts a fresh instance: a cluster that a `ray start` left on this
        # machine is joined only when asked for (--ray-address auto), never by surprise.
        logger.info("starting a local Ray with %d CPUs", os.cpu_count() or 1)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env)
    from ray.data import DataContext

    # Ray Data's bars redraw with carriage returns, which `ray job logs` and log files show as noise; every
    # long stage logs plain progress lines instead (core/progress.py).
    DataContext.get_current().enable_progress_bars = False


def ray_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS; None for a Ray of this process's own, which
    "local" (Ray's own word for it) also asks for."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def is_local_ray(address: str | None) -> bool:
    """Whether the job runs on a Ray it starts on this machine (its cores are the job's to share)."""
    return ray_address(address) is None


def default_threads(actors: int, cpus: float, address: str | None) -> int:
    """Threads per model actor: a local run shares this machine's cores; a cluster actor uses its CPUs."""
    if is_local_ray(address):
        return max(1, (os.cpu_count() or 1) // max(actors, 1))
    return max(1, int(cpus))
