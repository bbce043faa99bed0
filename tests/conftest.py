"""Shared fixtures: the tiny preset, built once per test session into a private cache."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

S3_BUCKET = "pv-ray-test"

# Keep Ray, MLflow and torch quiet and local in every test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model.compile runs on GPUs, as Triton kernels; on this CPU inductor writes C++ instead, and its
# vectorised variants take a third of a cold compile (test_speed_switches' two compiled-UNet tests:
# 274 s cold, 187 s with plain loops; CI's cache is always cold). What those tests check (no
# recompilation on an adapter swap, the backward through the compiled forward, results equal to
# eager ones) does not depend on how the CPU kernels are vectorised. Read when inductor loads.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

CHECKOUT = Path(__file__).resolve().parents[1]
_checkout_key = pytest.StashKey[str | None]()


def checkout_status() -> str | None:
    """`git status` of this checkout (ignored files left out), or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=all"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session) -> None:
    session.config.stash[_checkout_key] = checkout_status()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    """The suite fails when it changed the checkout: no test may write there (personal data
    such as face descriptors in an MLflow store once landed in git that way)."""
    before, after = session.config.stash.get(_checkout_key, None), checkout_status()
    if before is not None and after is not None and after != before:
        changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
        sys.stderr.write("\nFAILED: the test suite changed the checkout's `git status`:\n")
        sys.stderr.write("".join(f"  {line}\n" for line in changed[:50]))
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # what pytest returns, read after this hook


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Keep the fault handler on through the interpreter's own teardown (pytest's plugin turns
    it off just before): a native destructor that crashes there prints its Python stacks instead
    of a bare exit 139. Such a crash once ended the full suite after its summary; a full run
    without the `os._exit` that hid it exited normally (the note of issue 26 has the run)."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A PV_RAY_CACHE for this session, inherited by CLI subprocesses and Ray workers."""
    cache = Path(os.environ.get("PV_RAY_TEST_CACHE") or tmp_path_factory.mktemp("pv-ray-cache"))
    os.environ["PV_RAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_models(model_cache: Path) -> Path:
    """The tiny pipeline folder (unet/, vae/, ..., motion_adapter/, faces/), seed 0."""
    from pv_ray.presets.tiny import ensure_tiny_models

    return ensure_tiny_models(seed=0)


@pytest.fixture(scope="session")
def tiny_prior_models(model_cache: Path) -> Path:
    """The tiny-prior folder: the tiny preset with the shipped trained VAE, UNet, motion adapter."""
    from pv_ray.presets.tiny import ensure_tiny_prior_models

    return ensure_tiny_prior_models()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tiny_models) -> Path:
    """A small CLIP model with seeded random weights, saved as transformers writes real ones."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models / "tokenizer")
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        # The text tower pools at the end-of-text token: its id must be the tokenizer's.
        text_config={
            **layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def style_loras(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Two SD1.5-style LoRAs for the tiny UNet, as other tools write them: `diffusers` (saved by
    plain diffusers, on self- and cross-attention) and `kohya` (the same weights in kohya/A1111
    keys with alpha), plus `warm`, a second diffusers LoRA with other weights."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("styles")
    paths = {}
    for name, seed in (("diffusers", 1), ("warm", 2)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(tiny_models / "unet")
        config = LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
        unet.add_adapter(config)
        peft_weights = get_peft_model_state_dict(unet)
        StableDiffusionPipeline.save_lora_weights(
            folder / name, unet_lora_layers=convert_state_dict_to_diffusers(peft_weights), safe_serialization=True
        )
        paths[name] = folder / name / "pytorch_lora_weights.safetensors"
        if name == "diffusers":
            save_file(
                convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_weights.items()}),
                folder / "kohya.safetensors",
            )
            paths["kohya"] = folder / "kohya.safetensors"
    return paths


@pytest.fixture(scope="module")
def ray_cluster(model_cache, tiny_models):
    """A private local Ray cluster for a module's batch jobs (4 logical CPUs: workers and ingest)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PV_RAY_CACHE": str(model_cache)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_face_pack(tmp_path_factory) -> Path:
    """The tiny insightface pack (det_tiny.onnx + rec_tiny.onnx), seed 0."""
    from pv_ray.faces.tiny_pack import build_tiny_face_pack

    return build_tiny_face_pack(tmp_path_factory.mktemp("faces"), seed=0)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 with one bucket."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    ).create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()


def s3_options(endpoint: str) -> dict:
    return {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class MlflowServer:
    url: str
    artifacts: Path  # its --artifacts-destination: where runs' artifacts land through its proxy


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` over a sqlite store, proxying artifacts to a local folder: one per
    test run (its start costs seconds), shared by the tests that need one; each keeps to its own
    batch ids and identities."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # No background job runner (huey consumers): not needed for tracking, slow to start.
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: the uvicorn child is stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp_path / "server.log").read_text()
                raise RuntimeError(f"mlflow server did not start:\n{log_text}")
            time.sleep(0.5)
        yield MlflowServer(url, tmp_path / "server-artifacts")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer) -> str:
    """The test run's `mlflow server`, by its URL."""
    return mlflow_server_process.url
