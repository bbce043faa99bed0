"""The batch job beyond one process: a two-node cluster, and `ray job submit` to a Ray head."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray

from pv_ray.cluster.batch import run_batch
from pv_ray.config import load_config
from pv_ray.presets.demo import demo_photos
from pv_ray.storage.adapter_store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.steps=2", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]
RAY = str(Path(sys.executable).with_name("ray"))


def write_identities(root: Path, count: int) -> list[str]:
    ids = []
    for i, (portrait, _) in enumerate(list(demo_photos().values())[:count]):
        identity_id = f"id-{i}"
        (root / identity_id).mkdir(parents=True)
        buffer = io.BytesIO()
        portrait.save(buffer, format="PNG")
        (root / identity_id / "photo.png").write_bytes(buffer.getvalue())
        ids.append(identity_id)
    return ids


def test_workers_land_on_both_nodes_of_a_two_node_cluster(tmp_path, model_cache, tiny_models):
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"PV_RAY_CACHE": str(model_cache)}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False, runtime_env=env)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        ids = write_identities(tmp_path / "in", 4)
        report = run_batch(load_config(TINY, FAST), str(tmp_path / "in"), str(tmp_path / "out"), workers=2)
        assert report.counts["done"] == 4
        nodes = {entry["node"] for entry in report.identities.values()}
        assert len(nodes) == 2, f"both nodes must run training workers, got {nodes}"
        assert AdapterStore(str(tmp_path / "out")).list_identities() == ids
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, model_cache, tiny_models):
    """A Ray head (with its job server) started by the `ray` CLI on 127.0.0.1, in a session of
    its own, stopped by signalling that session (never `ray stop`, which stops every cluster).
    Token authentication on, as the README sets it up: a token generated once into a home of the
    test's own, and RAY_AUTH_MODE=token on the head and on `ray job submit`."""
    port, dashboard = free_port(), free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ, "PV_RAY_CACHE": str(model_cache), "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home),
        "RAY_AUTH_MODE": "token", **NO_DRAIN,
    }  # fmt: skip
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    start = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_job_server(f"http://127.0.0.1:{dashboard}", head)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_session(head)
        # `ray start` records its head for later `ray.init()` calls on this machine, and a head
        # with token authentication stopped by SIGTERM leaves the record behind: every later
        # local `ray.init()` (a `pv-ray personalize` of another test) would wait minutes for it.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def wait_for_job_server(url: str, head: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and head.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for the token as it should
                return
            time.sleep(1)
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray head's job server at {url} did not come up")


# A node the test stops has no work left to drain: on SIGTERM it would still wait up to 30 s for
# the idle actors that outlive a job (its supervisor), for nothing.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which drains its node and stops the node's processes; then
    SIGKILL to whatever is left of the process group the test started. (SIGTERM to the whole group
    stops the GCS too, and the drain then waits its full 30 s for an answer that never comes.)"""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):  # nothing left: the node stopped every process
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_ray_job_submit_runs_the_personalize_job(tmp_path, ray_head):
    address, env = ray_head
    ids = write_identities(tmp_path / "in", 2)
    out = tmp_path / "out"
    sets = [arg for s in FAST for arg in ("--set", s)]
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--",
        sys.executable,
        str(ROOT / "jobs" / "personalize.py"),
        "--config",
        str(TINY),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--workers",
        "2",
        *sets,
    ]
    without_mode = {key: value for key, value in env.items() if key != "RAY_AUTH_MODE"}
    refused = subprocess.run(cmd, env=without_mode, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "authentication token" in refused.stderr, "the README's warning is stale"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    assert "streaming_executor" not in r.stdout + r.stderr, "Ray Data's per-operator log lines must not reach the user"
    assert AdapterStore(str(out)).list_identities() == ids
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["done"] == 2 and report["counts"]["failed"] == 0


def test_a_local_output_that_a_node_cannot_see_stops_the_job_before_any_work(tmp_path, model_cache, tiny_models):
    """A two-node cluster on one machine whose second node lives in a mount namespace of its
    own, with an empty tmpfs over the job's output folder: that path exists on the driver's side
    only, like a local disk on a real second machine. The job stops at once, naming the path,
    the node and what to use instead; a shared path passes the same check."""
    from ray.cluster_utils import Cluster

    from pv_ray.cluster.shared_paths import PathNotShared, check_shared

    private = tmp_path / "driver-only"
    private.mkdir()
    write_identities(tmp_path / "in", 1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    mount = f"mount -t tmpfs tmpfs {private} && exec {RAY} start --address={cluster.address} --num-cpus=1 --block"
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
        env={**os.environ, "PV_RAY_CACHE": str(model_cache), **NO_DRAIN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline and node.poll() is None, "the second node did not join"
            time.sleep(1)
        with pytest.raises(PathNotShared) as info:
            run_batch(load_config(TINY, FAST), str(tmp_path / "in"), str(private / "out"), workers=2)
        message = str(info.value)
        assert (
            f"--output {private / 'out'} (node " in message
            and "s3://" in message
            and "--tracking-uri http://" in message
        )
        assert f"sqlite tracking store {private / 'out'}" in message
        assert not (private / "out" / "adapters").exists(), "nothing was tuned"
        assert [p.name for p in (private / "out").iterdir() if p.name.startswith(".pv-ray-shared")] == []
        check_shared({"--output": str(tmp_path / "shared-out"), "--input": str(tmp_path / "in")})  # seen by both nodes
    finally:
        ray.shutdown()
        stop_session(node)
        cluster.shutdown()
