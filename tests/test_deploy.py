"""The deployment files: KubeRay manifests and the Serve config, checked against the CLI's own
argument parser, Ray Serve's schema and the application's argument model; and closed by default:
dashboards internal, secrets only from Kubernetes Secrets, `pv-ray serve` refusing a public bind
without an API key."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from cli_service import PV_RAY, PvRayService
from ray.serve.schema import ServeDeploySchema
from typer.main import get_command

from pv_ray.cli import TRACKING_ENV, app
from pv_ray.cluster.service import SERVING_APP
from pv_ray.config import load_config
from serving.app import AppArgs
from serving.guard import API_KEY_ENV, is_loopback

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = ("rayservice.yaml", "rayjob-personalize.yaml")
DASHBOARD_PORT, SERVE_PORT = 8265, 8000
# Names of settings that hold secrets (or URIs that may carry credentials).
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|_URI$", re.IGNORECASE)


def documents(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def load(path: Path) -> dict:
    """The file's first document: the RayJob or RayService."""
    return documents(path)[0]


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
        if args.config is not None:  # None: the config the store's adapters were tuned with
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
    cluster = service["spec"]["rayClusterConfig"]  # RayService's name for it (a RayJob's is rayClusterSpec)
    (gpu,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True and gpu["maxReplicas"] == args.max_replicas
    assert args.replica_gpus == 1 and args.store.startswith("s3://")
    assert all(c["envFrom"] == [{"secretRef": {"name": "pv-ray-serve"}}] for c in containers(cluster))


def test_the_repositorys_serve_config_is_valid():
    (args,) = check_serve_config(load(ROOT / "serving" / "config.yaml"))
    assert args.max_replicas >= args.min_replicas
    with pytest.raises(ValueError, match="max_replica"):
        AppArgs.model_validate(args.model_dump() | {"max_replicas_": 2})


def cluster_of(resource: dict) -> dict:
    return resource["spec"]["rayClusterSpec" if resource["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def opens(rule: dict, port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_the_dashboard_stays_inside_the_ray_cluster(manifest):
    """No 0.0.0.0 dashboard host, and a NetworkPolicy over every pod of the cluster that admits to
    the dashboard (whose Jobs API runs code) only this cluster's pods, the KubeRay operator and a
    RayJob's submitter; only Serve's port is open to other peers."""
    resource, policy = documents(KUBERNETES / manifest)
    cluster = cluster_of(resource)
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert "dashboard-host" not in head_params or is_loopback(head_params["dashboard-host"]), head_params
    assert policy["kind"] == "NetworkPolicy" and "Ingress" in policy["spec"]["policyTypes"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector, "an empty selector would be every pod of the namespace"
    for template in pod_templates(cluster):
        assert selector.items() <= template["metadata"]["labels"].items(), "a pod the policy does not cover"
    own_pods = {"podSelector": {"matchLabels": selector}}
    for rule in policy["spec"]["ingress"]:
        if "from" not in rule:  # from anywhere: Serve's port alone (it checks PV_RAY_API_KEY)
            assert [p["port"] for p in rule["ports"]] == [SERVE_PORT] and resource["kind"] == "RayService", rule
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
            if opens(rule, DASHBOARD_PORT) and peer != own_pods:
                labels = peer["podSelector"]["matchLabels"]
                operator = labels == {"app.kubernetes.io/component": "kuberay-operator"} and peer["namespaceSelector"]
                submitter = labels.get("ray.io/originated-from-cr-name") == resource["metadata"]["name"]
                assert operator or submitter, peer


def secret_looking(env: dict | None) -> list[str]:
    return [name for name in (env or {}) if SECRET_NAME.search(name)]


def runtime_envs(serve_config: dict) -> list[dict]:
    """Every runtime_env of a Serve config: per application and per deployment."""
    found = []
    for application in serve_config.get("applications", []):
        found.append(application.get("runtime_env") or {})
        for deployment in application.get("deployments", []):
            found.append((deployment.get("ray_actor_options") or {}).get("runtime_env") or {})
    return found


def assert_no_secret_in(serve_config: dict) -> None:
    for runtime_env in runtime_envs(serve_config):
        assert not secret_looking(runtime_env.get("env_vars")), runtime_env
    for application in serve_config.get("applications", []):
        options = application.get("args", {}).get("storage_options") or {}
        assert not [k for k in options if SECRET_NAME.search(k)], options


def test_secrets_come_from_kubernetes_secrets_never_from_a_runtime_env():
    """The Serve REST API (and the dashboard) show runtime_env.env_vars and a RayJob's runtime env to
    anyone who can reach them: secrets reach the pods from Secrets (envFrom, secretKeyRef) only."""
    for manifest in MANIFESTS:
        resource = load(KUBERNETES / manifest)
        spec = resource["spec"]
        if "serveConfigV2" in spec:
            assert_no_secret_in(yaml.safe_load(spec["serveConfigV2"]))
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        assert not secret_looking(runtime_env.get("env_vars")), runtime_env
        for container in containers(cluster_of(resource)):
            assert [s["secretRef"]["name"] for s in container["envFrom"]], container["name"]
            for variable in container.get("env", []):  # a literal value of a secret: refused
                assert not SECRET_NAME.search(variable["name"]) or "secretKeyRef" in variable.get("valueFrom", {})
    assert_no_secret_in(load(ROOT / "serving" / "config.yaml"))
    # Its comments no longer advise the key in a runtime_env either.
    advice = (ROOT / "serving" / "config.yaml").read_text()
    assert not re.search(r"env_vars:.*" + API_KEY_ENV, advice) and "secret: ..." not in advice


def test_a_public_bind_without_an_api_key_refuses_to_start(tmp_path):
    """Closed by default: any address but loopback needs PV_RAY_API_KEY (or the explicit insecure flag):
    exit 2 with one line saying how, before anything starts."""
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    for host in ("0.0.0.0", "::", "192.0.2.10"):  # 192.0.2.0/24: a documentation address, nothing binds it
        r = subprocess.run(
            [PV_RAY, "serve", "--store", str(tmp_path), "--host", host],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (host, r.stderr)
        assert f"--host {host}" in lines[0] and f"export {API_KEY_ENV}=" in lines[0]
        assert "--insecure-no-api-key" in lines[0] and "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_a_public_bind_with_an_api_key_serves_and_asks_for_it(tmp_path, tiny_models):
    key = "deploy-test-key-7c1e"
    args = ["--store", str(tmp_path), "--config", str(ROOT / "configs" / "tiny.yaml"), "--host", "0.0.0.0"]
    with PvRayService(args, cwd=tmp_path, env={API_KEY_ENV: key}) as service:
        local = f"http://127.0.0.1:{service.port}"
        assert requests.get(f"{local}/healthz", timeout=30).status_code == 200
        refused = requests.get(f"{local}/v1/identities", timeout=30)
        assert refused.status_code == 401 and "Authorization: Bearer <key>" in refused.json()["detail"]
        allowed = requests.get(f"{local}/v1/identities", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert allowed.status_code == 200 and allowed.json() == {"identities": [], "next": None}
