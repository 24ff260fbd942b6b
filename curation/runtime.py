"""What every job shares: storage and Ray settings, and joining or starting Ray."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from curation.storage import StorageOptions

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Settings shared by every job; stage configs inherit them."""

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


# Fields that change how a run executes, not what it produces: they stay out of a stage's hash.
EXECUTION_FIELDS = frozenset(
    {"s3_endpoint", "s3_region", "ray_address", "force", "encode_actors", "cpus_per_actor", "torch_threads"}
)


def init_ray(address: str | None = None) -> None:
    """Join the cluster named by `address` or $RAY_ADDRESS, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    if address:
        logger.info("joining Ray at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # address="local" always starts a fresh instance: a cluster that a `ray start` left on this
        # machine is joined only when asked for (--ray-address auto), never by surprise.
        logger.info("starting a local Ray with %d CPUs", os.cpu_count() or 1)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def is_local_ray(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def default_torch_threads(actors: int, cpus_per_actor: float, address: str | None) -> int:
    """Threads per model actor: a local run shares this machine's cores; a cluster actor uses its CPUs."""
    if is_local_ray(address):
        return max(1, (os.cpu_count() or 1) // max(actors, 1))
    return max(1, int(cpus_per_actor))
