"""The deployment files: KubeRay manifests and the Serve config, checked against the CLI's own
argument parser, Ray Serve's schema and the application's argument model."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.main import get_command

from pv_ray.cli import TRACKING_ENV, app
from pv_ray.cluster.service import SERVING_APP
from pv_ray.config import load_config
from serving.app import AppArgs

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def containers(cluster: dict) -> list[dict]:
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def personalize_params(entrypoint: str) -> dict:
    """The entrypoint parsed by `pv-ray personalize`'s own parser (a bad option raises)."""
    python, script, *args = shlex.split(entrypoint)
    assert python == "python" and (ROOT / script).is_file() and script == "jobs/personalize.py"
    command = get_command(app).commands["personalize"]
    return command.make_context("personalize", args).params


def check_serve_config(serve_config: dict) -> list[AppArgs]:
    """Valid for Ray Serve (its deploy schema) and for pv-ray's application (AppArgs, config)."""
    schema = ServeDeploySchema.model_validate(serve_config)
    checked = []
    for application in schema.applications:
        assert application.import_path == SERVING_APP
        args = AppArgs.model_validate(application.args)
        load_config(ROOT / args.config, args.overrides)
        checked.append(args)
    return checked


def test_the_rayjob_runs_the_personalize_entrypoint_on_gpu_workers():
    job = load(KUBERNETES / "rayjob-personalize.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    params = personalize_params(job["spec"]["entrypoint"])
    assert params["input"].startswith("s3://") and params["output"].startswith("s3://")
    cfg = load_config(ROOT / params["config"])
    assert cfg.model.dtype == "bfloat16"
    cluster = job["spec"]["rayClusterSpec"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == params["workers"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # S3 keys and the MLflow server come from one Secret on every pod; pv-ray reads the URI from
    # the environment, so no secret is ever written into the entrypoint.
    assert all(c["envFrom"] == [{"secretRef": {"name": "pv-ray"}}] for c in containers(cluster))
    tracking = next(p for p in get_command(app).commands["personalize"].params if p.name == "tracking_uri")
    assert tracking.envvar == TRACKING_ENV and TRACKING_ENV in (KUBERNETES / "rayjob-personalize.yaml").read_text()
    assert params["tracking_uri"] is None  # read from the environment at run time


def test_a_typo_in_the_entrypoint_is_caught_by_the_parser():
    # typer carries its own click, whose exception classes are private: matched by message.
    with pytest.raises(Exception, match="No such option: --worker"):
        personalize_params("python jobs/personalize.py --worker 4")
    with pytest.raises(Exception, match="greater than or equal to 1"):
        personalize_params("python jobs/personalize.py --workers 0")


def test_the_rayservice_carries_a_valid_serve_config():
    service = load(KUBERNETES / "rayservice.yaml")
    assert service["kind"] == "RayService"
    (args,) = check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterSpec"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True and gpu["maxReplicas"] == args.max_replicas
    assert args.replica_gpus == 1 and args.store.startswith("s3://")
    assert all(c["envFrom"] == [{"secretRef": {"name": "pv-ray-serve"}}] for c in containers(cluster))


def test_the_repositorys_serve_config_is_valid():
    (args,) = check_serve_config(load(ROOT / "serving" / "config.yaml"))
    assert args.max_replicas >= args.min_replicas
    with pytest.raises(ValueError, match="max_replica"):
        AppArgs.model_validate(args.model_dump() | {"max_replicas_": 2})
