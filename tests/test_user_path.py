"""The README's commands as a new user types them: a scratch working directory, relative paths,
default flags. The main job (embedded default config and demo set, fewer steps), then the serve
command on the folder it printed, then a request per identity; then autoscaling under load."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from cli_service import PV_RAY, PvRayService, free_port, live_processes_in_group, running
from personal_traces import found_in, traces_of
from PIL import Image

from pv_ray.storage.video import read_video

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Ray's C++ error lines look like "[2026-12-02 12:39:59,312 E 14582 14582] core_worker.cc:...".
ERROR_LINE = re.compile(r"\bERROR\b|^\[[^\]]* E \d+ \d+\]", re.MULTILINE)
DEMO_IDS = ["astronaut", *(f"group-person-{i}" for i in range(1, 7)), "tom-hanks"]


def generate(url: str, **body) -> requests.Response:
    payload = {"prompt": "a person walking", "num_frames": 2, "num_inference_steps": 2, "seed": 0, "format": "gif"}
    return requests.post(f"{url}/v1/generate", json=payload | body, timeout=300)


def test_the_readme_main_job_then_serving_its_output(tmp_path, model_cache):
    scratch = tmp_path / "work"
    scratch.mkdir()
    fast = ["--set", "train.steps=2", "--set", "eval.num_prompts=1", "--set", "eval.num_frames=2"]
    r = subprocess.run(
        [PV_RAY, "personalize", "--workers", "2", *fast], cwd=scratch, capture_output=True, text=True, timeout=1200
    )
    output = r.stdout + r.stderr
    assert r.returncode == 0, output
    assert not ERROR_LINE.search(output), output
    assert "8 identities: 8 tuned" in output
    adapters = scratch / "out" / "personalize" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == DEMO_IDS, "every adapter under ./out/personalize/adapters"
    assert all((adapters / i / "_COMPLETE").is_file() for i in DEMO_IDS)
    sheet = scratch / "out" / "personalize" / "contact_sheet.png"
    assert "contact_sheet.png" in output
    with Image.open(sheet) as image:  # a row per identity: reference photo, base and adapted frames
        assert image.height > 8 * 2 * 128 and image.width > 128 * 3  # label, photo, 2 frames (eval.num_frames=2)

    store = scratch / "out" / "personalize"
    needles = traces_of(json.loads((store / "adapters" / "astronaut" / "adapter.json").read_text()), "astronaut")
    # Neither generate nor serve is given a config: both take the one the store was tuned with.
    clip = ["--prompt", "a person walking", "--frames", "2", "--steps", "2", "--out", "tom.gif"]
    r = subprocess.run(
        [PV_RAY, "generate", "--adapter", "out/personalize/adapters/tom-hanks", *clip], cwd=scratch,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with PvRayService(["--store", "out/personalize"], cwd=scratch) as service:
        page = requests.get(f"{service.url}/v1/identities", timeout=30).json()
        assert page == {"identities": DEMO_IDS, "next": None}
        served = generate(service.url, identity="tom-hanks")
        assert served.content == (scratch / "tom.gif").read_bytes(), "served and generated videos differ"
        for identity_id in DEMO_IDS:
            response = generate(service.url, identity=identity_id)
            assert response.status_code == 200, (identity_id, response.text)
            assert read_video(response.content, format="gif").shape == (2, 128, 128, 3)

        # A person asks to be erased while the service runs (and holds their adapter in its cache):
        # `pv-ray delete` on the same relative path, then nothing of them is served or stored.
        body = {"prompt": "a person walking", "num_frames": 2, "num_inference_steps": 2, "format": "gif"}
        job = requests.post(f"{service.url}/v1/jobs", json=body | {"identity": "astronaut"}, timeout=30).json()
        deadline = time.monotonic() + 300
        while requests.get(f"{service.url}/v1/jobs/{job['id']}", timeout=30).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert (store / "jobs" / job["id"] / "video.gif").is_file()
        r = subprocess.run(
            [PV_RAY, "delete", "--store", "out/personalize", "astronaut"], cwd=scratch, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        said = " ".join((r.stdout + r.stderr).split())
        assert r.returncode == 0, said
        assert f"serving job {job['id']}" in said and "contact_sheet.png" in said and "MLflow run" in said
        assert generate(service.url, identity="astronaut").status_code == 404
        assert generate(service.url, identity="tom-hanks").status_code == 200
        page = requests.get(f"{service.url}/v1/identities", timeout=30).json()
        assert page["identities"] == DEMO_IDS[1:]
        service.stop(signal.SIGTERM)  # as `kill`, systemd or a container stop sends it
    said = "".join(service.lines)
    assert service.process.returncode == 0 and said.rstrip().endswith("stopping"), said[-2000:]
    assert "SIGTERM received" not in said
    deadline = time.monotonic() + 30
    while live_processes_in_group(service.process.pid):  # the local Ray it started, stopped too
        assert time.monotonic() < deadline, live_processes_in_group(service.process.pid)
        time.sleep(1)
    assert found_in(store, needles) == []

    # `serve run serving/config.yaml` (no config named: the recorded one) serves the demo store as
    # `pv-ray serve` did. On a free port: the file's 8000 may be taken on a test machine.
    port = free_port()
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text((ROOT / "serving" / "config.yaml").read_text().replace("port: 8000", f"port: {port}"))
    url = f"http://127.0.0.1:{port}"
    serve_run = [str(Path(PV_RAY).with_name("serve")), "run", str(serve_config)]
    with running(serve_run, scratch, f"{url}/healthz", signal.SIGINT):
        assert generate(url, identity="tom-hanks").content == (scratch / "tom.gif").read_bytes()

    # The README's MLflow UI on the demo's store (on a free port): the runs are there, the erased
    # identity's are not.
    port = free_port()
    ui = [
        str(Path(PV_RAY).with_name("mlflow")), "ui", "--backend-store-uri", "sqlite:///out/personalize/mlflow.db",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with running(ui, scratch, f"http://127.0.0.1:{port}/health", signal.SIGTERM):
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "pv-ray"}, timeout=30)
        assert experiment.status_code == 200, experiment.text
        search = {"experiment_ids": [experiment.json()["experiment"]["experiment_id"]], "max_results": 100}
        runs = requests.post(f"{api}/runs/search", json=search, timeout=30).json()["runs"]
        tagged = {tag["value"] for run in runs for tag in run["data"].get("tags", []) if tag["key"] == "identity_id"}
        assert tagged == set(DEMO_IDS[1:]), tagged


UPSCALE_DELAY_S = 1


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory, model_cache, tiny_models):
    """`pv-ray serve --max-replicas 2` on this machine (2 cores in CI) over three identities, and a
    driver connected to its Ray cluster to watch the replicas."""
    import ray

    from pv_ray.backbones import load_backbone
    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters

    tiny = str(ROOT / "configs" / "tiny.yaml")
    store = tmp_path_factory.mktemp("autoscaled") / "store"
    cfg = load_config(tiny, ["adapter.active_fraction=1.0"])
    write_random_adapters(load_backbone(cfg.model), cfg, str(store), ["alice", "bob", "carol"], scale=0.3)
    args = ["--config", tiny, "--store", str(store), "--set", "adapter.active_fraction=1.0", "--max-replicas", "2"]
    args += ["--upscale-delay", str(UPSCALE_DELAY_S), "--downscale-delay", "5", "--target-ongoing", "1"]
    with PvRayService(args) as service:
        ray.init(address=service.ray_address, log_to_driver=False, configure_logging=False)
        try:
            yield service
        finally:
            ray.shutdown()


def generator_replicas() -> dict[str, int]:
    from ray import serve

    return serve.status().applications["pv-ray"].deployments["Generator"].replica_states


def wait_for_one_replica(what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        states = generator_replicas()
        if states.get("RUNNING", 0) == 1 and sum(states.values()) == 1:
            return
        assert time.monotonic() < deadline, f"still {states} two minutes after {what}"
        time.sleep(1)


class Load:
    """`clients` threads sending the cases round robin until stopped: (case, replica, when answered,
    video) per answer, times from the load's start."""

    def __init__(self, url: str, cases: list[tuple], clients: int):
        self.url, self.cases, self.answers, self.refused = url, cases, [], []
        self.stop = threading.Event()
        self.start = time.monotonic()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, i: int) -> None:
        sent = 0
        while not self.stop.is_set():
            case = self.cases[(i + sent) % len(self.cases)]
            sent += 1
            response = generate(self.url, identity=case[0], seed=case[1])
            if response.status_code != 200:
                self.refused.append(f"{response.status_code} {response.text}")
                continue
            replica, when = response.headers["x-pv-ray-replica"], time.monotonic() - self.start
            self.answers.append((case, replica, when, response.content))

    def first_answer(self) -> dict[str, float]:
        first: dict[str, float] = {}
        for _, replica, when, _ in list(self.answers):
            first.setdefault(replica, when)
        return first

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not self.refused, self.refused[:3]


def test_identity_requests_spread_over_the_replica_autoscaling_adds(autoscaled):
    """Identity requests only (3 identities, 8 clients): Serve adds a second generator replica and
    it serves within 10 s of running; over the next 60 s each replica answers at least a third of
    the requests; every answer equals the same request sent alone."""
    cases = [(identity, seed) for identity in ("alice", "bob", "carol") for seed in (0, 1)]
    alone = {case: generate(autoscaled.url, identity=case[0], seed=case[1]).content for case in cases}
    load = Load(autoscaled.url, cases, clients=8)
    running_at = None
    try:
        while len(load.first_answer()) < 2:
            if running_at is None and generator_replicas().get("RUNNING", 0) == 2:
                running_at = time.monotonic() - load.start
            assert time.monotonic() - load.start < 240, f"one replica answered all {len(load.answers)} requests"
            time.sleep(0.2)
        second = sorted(load.first_answer().values())[1]
        window = (second, second + 60)
        time.sleep(max(0.0, load.start + window[1] - time.monotonic()))
    finally:
        load.finish()
    running_at = second if running_at is None else running_at
    in_window = [replica for _, replica, when, _ in load.answers if window[0] <= when <= window[1]]
    shares = {replica: in_window.count(replica) / len(in_window) for replica in set(in_window)}
    print(
        f"\nsecond replica running {running_at:.1f} s after the load started, first answer at {second:.1f} s; "
        f"answers over the next 60 s: {len(in_window)}, shares {sorted(shares.values())}"
    )
    assert second - running_at <= 10, (running_at, second)
    assert len(shares) == 2 and min(shares.values()) >= 1 / 3, shares
    for case, _, _, content in load.answers:
        assert content == alone[case], f"{case}: another answer than the same request alone"
    wait_for_one_replica("the identity load stopped")


def test_a_second_generator_replica_serves_base_model_load_and_goes_when_idle(autoscaled):
    """Base-model requests carry no identity (the router may send them to any replica): under
    sustained load a second replica starts and answers, every answer equal to the same request sent
    alone; once idle, Serve goes back to one replica."""
    wait_for_one_replica("the module's previous load")
    cases = [(None, seed) for seed in (0, 1, 2)]
    alone = {case: generate(autoscaled.url, identity=None, seed=case[1]).content for case in cases}
    load = Load(autoscaled.url, cases, clients=8)
    try:
        while len(load.first_answer()) < 2:
            assert time.monotonic() - load.start < 240, f"one replica answered all {len(load.answers)} requests"
            time.sleep(0.5)
    finally:
        load.finish()
    print(f"\nsecond replica's first answer {sorted(load.first_answer().values())[1]:.1f} s after the load started")
    for case, _, _, content in load.answers:
        assert content == alone[case], case
    wait_for_one_replica("the load stopped")
