"""Isolation over real HTTP, on a real Serve app (serving/app.py) on 127.0.0.1.

A request whose client goes away keeps its replica until its generation thread has stopped (at
the next denoising step boundary), so the request sent right after it gets exactly the video it
gets alone; an adapter answers only to the id it records; refusals name no internal path.

The tiny backbone at the tiny config's isolation window (the adapter on in the last quarter of the
timesteps): two generations running at once on one replica route each other's UNet calls, which is
what a generation left running after its request would do to the next one.
"""

from __future__ import annotations

import http.client
import json
import select
import shutil
import time
from pathlib import Path

import pytest
import requests
from test_serving import TINY, metrics_url, ray_serve  # noqa: F401  (module fixtures of this file's own cluster)

pytestmark = pytest.mark.slow

ROUNDS = 10
DROP_AFTER_S = 1.0
FRAMES, STEPS = 4, 8  # the second request of each round
LONG_FRAMES = 8  # the dropped request: 8 frames at limits.max_steps, several seconds on a CPU
SHORT = {"prompt": "a person walking", "num_frames": FRAMES, "num_inference_steps": STEPS, "seed": 3, "format": "gif"}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_models) -> Path:
    """Random identities `ann` and `ben`; `mallory`, a copy of ann's folder (hashes intact) as a copied
    folder or a case-folding mount would leave it, whose adapter.json records ann; `flipped`, whose
    weights changed after they were stored; `elsewhere`, ann's weights recorded as tuned on other
    backbone weights."""
    from pv_ray.backbones import load_backbone
    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters
    from pv_ray.storage.adapter_folder import WEIGHTS_NAME
    from pv_ray.storage.adapter_store import AdapterStore

    root = tmp_path_factory.mktemp("isolation-store")
    cfg = load_config(TINY)
    write_random_adapters(load_backbone(cfg.model), cfg, str(root), ["ann", "ben", "flipped"], scale=0.3)
    shutil.copytree(root / "adapters" / "ann", root / "adapters" / "mallory")
    weights = root / "adapters" / "flipped" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(root / "adapters" / "ann" / WEIGHTS_NAME, elsewhere / WEIGHTS_NAME)
    other = {"family": "animatediff", "fingerprint": "f" * 64, "name": "tiny-prior"}
    (elsewhere / "adapter.json").write_text(json.dumps({"identity_id": "elsewhere", "backbone": other}))
    AdapterStore(str(root)).put("elsewhere", elsewhere)
    return root


@pytest.fixture(scope="module")
def url(ray_serve, store_root) -> str:  # noqa: F811
    from ray import serve

    from serving.app import app_builder

    args = {"config": TINY, "store": str(store_root), "replica_cpus": 1}
    serve.run(app_builder(args), name="pv-ray", route_prefix="/")
    return ray_serve


def post(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=SHORT | body, timeout=300)


def dropped(url: str, after_s: float, **body) -> None:
    """Send a generation request and close the connection after `after_s`, before its answer."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/generate", json.dumps(SHORT | body), {"content-type": "application/json"})
    time.sleep(after_s)
    answered, _, _ = select.select([connection.sock], [], [], 0)
    connection.close()  # the client goes away mid-generation
    assert not answered, "the long request was answered before the drop: make it longer"


def prometheus(endpoint: str, name: str, label: str = "") -> float:
    """The sum over the pv-ray application's series of `name` (holding `label`) on Ray's endpoint."""
    total = 0.0
    for line in requests.get(endpoint, timeout=10).text.splitlines():
        if line.startswith(f"ray_{name}{{") and 'application="pv-ray"' in line and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_dropped_request_stops_at_its_next_step_and_never_touches_the_next_request(url, metrics_url):  # noqa: F811
    """Over 10 rounds: a long request of ann dropped after 1 s, at once a request of the base model or
    of ben (alternately) that must be byte for byte its video sent alone. Every dropped generation
    ends within one denoising step of its cancel (the replica's own count, on Prometheus)."""
    alone = {identity: post(url, identity=identity) for identity in (None, "ben")}
    assert all(r.status_code == 200 for r in alone.values()), [r.text for r in alone.values()]
    assert alone[None].content != alone["ben"].content, "ben's adapter must show, or the rounds prove nothing"
    assert post(url, identity="ben").content == alone["ben"].content, "a request alone is deterministic"
    assert post(url, identity="ann").status_code == 200  # ann cached: the long request generates at once
    cancelled, within_a_step = "pv_ray_generation_steps_after_cancel_count", "pv_ray_generation_steps_after_cancel"
    before = prometheus(metrics_url, cancelled), prometheus(metrics_url, f"{within_a_step}_bucket", 'le="1.0"')

    for round_ in range(ROUNDS):
        second = None if round_ % 2 == 0 else "ben"
        dropped(url, DROP_AFTER_S, identity="ann", num_frames=LONG_FRAMES, num_inference_steps=50, seed=round_)
        response = post(url, identity=second)
        assert response.status_code == 200, response.text
        assert response.content == alone[second].content, f"round {round_}: {second or 'the base model'} changed"

    deadline = time.monotonic() + 60  # the replica reports its metrics every second
    while prometheus(metrics_url, cancelled) - before[0] < ROUNDS:
        assert time.monotonic() < deadline, f"{prometheus(metrics_url, cancelled) - before[0]} of {ROUNDS} cancelled"
        time.sleep(1)
    assert prometheus(metrics_url, cancelled) - before[0] == ROUNDS
    steps_ok = prometheus(metrics_url, f"{within_a_step}_bucket", 'le="1.0"') - before[1]
    assert steps_ok == ROUNDS, f"{ROUNDS - steps_ok} dropped generations ran more than one step past their cancel"


def test_an_adapter_recording_another_identity_is_refused(url, store_root):
    """mallory's folder holds ann's adapter (its files intact): 500 with a reason, never ann's face;
    ann herself is unaffected."""
    for _ in range(2):  # refused before Serve's cache: the second try is refused the same way
        response = post(url, identity="mallory")
        assert response.status_code == 500, response.text
        assert response.json() == {"detail": "adapter 'mallory' cannot be loaded: it records another identity"}
    assert post(url, identity="ann").status_code == 200


def test_an_adapter_tuned_on_another_backbone_is_refused(url):
    response = post(url, identity="elsewhere")
    assert response.status_code == 500, response.text
    assert response.json() == {
        "detail": "adapter 'elsewhere' cannot be loaded: it was tuned on another backbone than this server's "
        "(serve it with its own config)"
    }


def test_refusals_name_no_internal_path(url, store_root):
    """404, 500 and 422 bodies say what is wrong without the store's location (the details go to the
    replica's log)."""
    for status, identity, reason in [
        (404, "nobody", "unknown identity 'nobody': no adapter in the store"),
        (500, "flipped", "it is corrupt (a file does not match its recorded sha256"),
        (500, "mallory", "it records another identity"),
    ]:
        response = post(url, identity=identity)
        assert response.status_code == status and reason in response.json()["detail"], response.text
        for internal in (str(store_root), store_root.name, "adapters/", "Traceback"):
            assert internal not in response.text, (identity, response.text)
