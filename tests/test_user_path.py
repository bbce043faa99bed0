"""The README's commands as a new user types them: a scratch working directory, relative paths,
default flags. The main job (embedded default config and demo set, fewer steps), then the serve
command on the folder it printed, then a request per identity; then autoscaling under load."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from cli_service import PV_RAY, PvRayService
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
    with PvRayService(["--store", "out/personalize"], cwd=scratch) as service:
        page = requests.get(f"{service.url}/v1/identities", timeout=30).json()
        assert page == {"identities": DEMO_IDS, "next": None}
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
    assert found_in(store, needles) == []


def test_a_second_generator_replica_serves_under_load_and_goes_when_idle(tmp_path, model_cache, tiny_models):
    """`pv-ray serve --max-replicas 2` on this machine (2 cores in CI): under sustained load from
    concurrent clients a second replica starts and answers, every answer equal to the same
    request sent alone; once idle, Serve goes back to one replica."""
    import ray
    from ray import serve

    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters

    tiny = str(ROOT / "configs" / "tiny.yaml")
    write_random_adapters(load_config(tiny), str(tmp_path / "store"), ["alice", "bob"], scale=0.3)
    args = ["--config", tiny, "--store", str(tmp_path / "store"), "--set", "adapter.active_fraction=1.0"]
    args += ["--max-replicas", "2", "--upscale-delay", "1", "--downscale-delay", "5", "--target-ongoing", "1"]
    # Base-model requests carry no identity, so the router may send them to any replica (identity
    # requests prefer the replica that holds the identity).
    cases = [(identity, seed) for identity in ("alice", "bob", None) for seed in (0, 1)]
    with PvRayService(args) as service:
        alone = {case: generate(service.url, identity=case[0], seed=case[1]).content for case in cases}
        answers: list[tuple[tuple, str, bytes]] = []
        first_answer: dict[str, float] = {}
        stop = threading.Event()
        start = time.monotonic()

        def client(i: int) -> None:
            while not stop.is_set():
                case = cases[(i + len(answers)) % len(cases)]
                response = generate(service.url, identity=case[0], seed=case[1])
                replica = response.headers["x-pv-ray-replica"]
                answers.append((case, replica, response.content))
                first_answer.setdefault(replica, time.monotonic() - start)
                if len(first_answer) >= 2 and time.monotonic() - start > first_answer[replica] + 5:
                    stop.set()

        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
        assert len(first_answer) == 2, f"one replica answered all {len(answers)} requests"
        second = sorted(first_answer.values())[1]
        print(f"\nsecond replica's first answer {second:.1f} s after the load started ({len(answers)} requests)")
        for case, _, content in answers:
            assert np.array_equal(read_video(content, format="gif"), read_video(alone[case], format="gif")), case

        ray.init(address=service.ray_address, log_to_driver=False, configure_logging=False)
        try:
            deadline = time.monotonic() + 120
            while True:
                states = serve.status().applications["pv-ray"].deployments["Generator"].replica_states
                if states.get("RUNNING", 0) == 1 and sum(states.values()) == 1:
                    break
                assert time.monotonic() < deadline, f"still {states} two minutes after the load stopped"
                time.sleep(1)
        finally:
            ray.shutdown()
