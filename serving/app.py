"""pv-ray's HTTP service on Ray Serve: videos of identities whose adapters are in the store.

`app_builder` is the application's one entry: Serve configs name it (`serving/config.yaml`,
`import_path: serving.app:app_builder`) and `pv-ray serve` builds through it with the same
`args`, so both size the deployments in one place:

- the ingress (`serving.api.Api`) takes a tenth of a CPU: it only validates and forwards (how it
  routes and where it bounds the load: `serving.api`'s docstring);
- each generator replica (`serving.generator.Generator`, one backbone) takes one GPU where the
  cluster has GPUs, otherwise an even share of the CPUs left for `max_replicas` replicas, so
  that autoscaling up to `max_replicas` can actually place every replica (`replica_cpus` /
  `replica_gpus` set it by hand).
"""

# No `from __future__ import annotations`: Serve pickles the builders' classes by value.

import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from pv_ray.config import given_or_recorded_config
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.uris import absolute_uri, is_remote
from serving.api import Api
from serving.generator import DEFAULT_MAX_ADAPTERS_PER_REPLICA, Generator

INGRESS_CPUS = 0.1


class AppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of an application in a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    # The pv-ray config (model, video defaults, limits, adapter rank); None: the one the store's
    # adapters were tuned with (the packaged demo config for a store that records none).
    config: str | None = None
    store: str  # adapter store root (path or URI): the --output of `pv-ray personalize`
    storage_options: dict[str, Any] | None = None  # fsspec options, for s3:// etc.
    overrides: list[str] = []  # section.key=value, as --set
    max_adapters_per_replica: int = Field(DEFAULT_MAX_ADAPTERS_PER_REPLICA, ge=1)
    # Autoscaling of the generator replicas (Serve's autoscaling_config).
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)  # per-replica load (queued + running) aimed for
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)  # keep it long: a new replica reloads the backbone
    # Resources of one generator replica; None: sized for the cluster (module docstring).
    replica_cpus: float | None = Field(None, gt=0)
    replica_gpus: float | None = Field(None, ge=0)
    allow_other_backbone: bool = False  # serve adapters tuned on other backbone weights (deliberately)

    @model_validator(mode="after")
    def _bounds(self) -> "AppArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


def cluster_resources() -> dict[str, float]:
    """The connected Ray cluster's resources, or this machine's when Ray is not running."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def generator_resources(args: AppArgs, resources: dict[str, float]) -> dict[str, float]:
    """`ray_actor_options` resources of one generator replica (see the module docstring)."""
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    if gpus:
        return {"num_cpus": args.replica_cpus or 1.0, "num_gpus": gpus}
    share = math.floor((resources.get("CPU", 1.0) - INGRESS_CPUS) / args.max_replicas * 100) / 100
    return {"num_cpus": args.replica_cpus or max(0.05, share)}


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for `serve run serving/config.yaml`, Serve configs and `pv-ray serve`."""
    return build_app(AppArgs.model_validate(args))


def build_app(a: AppArgs, ingress_actor_options: dict[str, Any] | None = None) -> Application:
    """The application: `Api` ingress in front of autoscaled `Generator` replicas.

    The config is read here (on the machine that builds the app) and shipped as a dict, so
    replicas need no access to the file; a local store path is made absolute here.
    `ingress_actor_options` adds to the ingress's `ray_actor_options` (e.g. a runtime_env)."""
    store = absolute_uri(a.store)
    if not is_remote(store) and not Path(store).is_dir():
        raise ValueError(f"store {a.store}: folder not found")
    recorded = None if a.config else AdapterStore(store, a.storage_options).tuning_config()
    cfg = given_or_recorded_config(a.config, a.overrides, recorded).model_dump()
    autoscaling = {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    generator = Generator.options(
        autoscaling_config=autoscaling,
        ray_actor_options=generator_resources(a, cluster_resources()),
        # Per ingress replica: requests waiting for a free generator replica (serving.api docstring).
        max_queued_requests=cfg["serving"]["max_waiting_requests"],
    ).bind(cfg, store, a.storage_options, a.max_adapters_per_replica, a.allow_other_backbone)
    ingress_options = {"num_cpus": INGRESS_CPUS, **(ingress_actor_options or {})}
    return Api.options(ray_actor_options=ingress_options).bind(generator, cfg, store, a.storage_options)
