"""pv-ray's HTTP service on Ray Serve: videos of identities whose adapters are in the store.

Two deployments:

- ``Generator`` loads the backbone once per replica and injects ONE identity adapter. Identities
  are Serve multiplexed models (model id = identity id): a replica keeps the state dicts of its
  ``max_adapters_per_replica`` most recently used identities (LRU) and the router sends a
  request to a replica that already holds its identity. Per request the identity's weights are
  copied into the injected adapter in place and the video is generated; a lock
  around swap + generate keeps concurrent requests on one replica from seeing each other's
  weights, so every answer is exactly what the request would get alone.
- ``Api`` is the FastAPI ingress: request validation (limits, identity ids, body size, optional
  API key), the identity listing, and the mapping of failures to HTTP statuses.

``build_app`` (Python, ``pv-ray serve``) and ``app_builder`` (``serve run``/``serve deploy``
configs, see serving/config.yaml) assemble the application.
"""

# No `from __future__ import annotations`: Serve rebuilds the ingress routes outside this
# module, where FastAPI could not resolve string annotations such as 'GenerateBody'.

import asyncio
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pv_ray.config import config_from_dict, load_config
from pv_ray.storage.identity import InvalidIdentityId, validate_identity_id
from pv_ray.model.sampling import RequestError, SampleSpec, check_request
from pv_ray.storage.adapter_store import AdapterCorrupted, AdapterNotFound, AdapterStore, AdapterTooLarge
from pv_ray.storage.video import SUPPORTED_FORMATS

API_KEY_ENV = "PV_RAY_API_KEY"
MAX_BODY_BYTES = 16 * 1024  # a generate request is a few hundred bytes; refuse anything near this
DEFAULT_MAX_ADAPTERS_PER_REPLICA = 4
MAX_PAGE = 1000
LOADS_HEADER = "x-pv-ray-adapter-loads"  # adapters this replica has read from the store so far
REPLICA_HEADER = "x-pv-ray-replica"
OPEN_PATHS = frozenset({"/healthz"})  # reachable without the API key (load balancer probes)


@dataclass(frozen=True)
class VideoRequest:
    """A validated generation request (defaults filled in from the server config)."""

    identity: str | None
    prompt: str
    num_frames: int
    num_inference_steps: int
    seed: int
    format: str


@dataclass(frozen=True)
class Video:
    data: bytes
    media_type: str
    adapter_loads: int
    replica: str


@dataclass(frozen=True)
class Refusal:
    """A request the generator cannot serve and the HTTP status that says why. Returned, not
    raised: an expected 404 should not log a traceback in the replica."""

    status: int
    message: str


@dataclass(frozen=True)
class IdentityWeights:
    """One identity's adapter as read from the store: what the multiplexed cache holds."""

    identity_id: str
    state_dict: dict[str, Any]  # diffusers LoRA keys -> CPU tensors
    rank: int
    alpha: float


# ----------------------------------------------------------------------------------- generator


@serve.deployment(max_ongoing_requests=8)
class Generator:
    """One backbone and one injected adapter per replica; identities swapped in per request."""

    def __init__(self, config: dict[str, Any], store: str, storage_options: dict[str, Any] | None, max_adapters_per_replica: int):
        from pv_ray.model.adapter import IdentityAdapter
        from pv_ray.model.backbone import Backbone

        self.cfg = config_from_dict(config)
        self.backbone = Backbone.load(self.cfg.model)
        self.adapter = IdentityAdapter(self.backbone.unet, self.cfg.adapter, self.backbone.num_train_timesteps)
        self.store = AdapterStore(store, storage_options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.adapter_loads = 0
        self._swap_lock = asyncio.Lock()
        self._in_adapter: IdentityWeights | None = None  # whose weights the injected adapter holds

        # Decorated here, not on the class, so the cache size is an argument of the app; Serve
        # detects a multiplexed loader stored on the instance. A plain function (not a bound
        # method) because Serve keeps its cache as an attribute of the decorated callable.
        async def load_identity_weights(identity_id: str) -> IdentityWeights:
            return await self._read_identity(identity_id)

        self._identity_weights = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(load_identity_weights)

    async def _read_identity(self, identity_id: str) -> IdentityWeights:
        """The multiplexed loader. Raising here leaves Serve's cache and the adapter untouched."""
        from pv_ray.model.adapter import WEIGHTS_NAME, read_adapter_bytes

        validate_identity_id(identity_id)  # before any store access
        data = await asyncio.to_thread(self.store.read_weights_bytes, identity_id)
        state_dict, rank, alpha = read_adapter_bytes(data, source=f"{identity_id}/{WEIGHTS_NAME}")
        # Checked as it is read: an unfit adapter is refused (500) and never enters Serve's cache.
        self.adapter.check_fits(state_dict, rank)
        self.adapter_loads += 1
        return IdentityWeights(identity_id, state_dict, rank, alpha)

    async def generate(self, request: VideoRequest) -> Video | Refusal:
        from pv_ray.model.adapter import AdapterFileError
        from pv_ray.storage.video import encode_video, frames_to_uint8

        spec = SampleSpec(
            num_frames=request.num_frames,
            height=self.cfg.video.height,
            width=self.cfg.video.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=self.cfg.video.guidance_scale,
        )
        try:
            # The motion module's length is known only here, where the backbone is loaded.
            check_request(self.cfg.limits, spec, request.prompt, self.backbone.unet.config.motion_max_seq_length)
            weights = None
            if request.identity is not None:
                weights = await self._identity_weights(validate_identity_id(request.identity))
        except (RequestError, InvalidIdentityId) as e:
            return Refusal(422, str(e))
        except AdapterNotFound as e:
            return Refusal(404, f"unknown identity {request.identity!r}: {e}")
        except (AdapterCorrupted, AdapterTooLarge, AdapterFileError, FileNotFoundError) as e:
            # FileNotFoundError: the completion mark is there but a file it lists is not.
            return Refusal(500, f"adapter {request.identity!r} cannot be loaded: {e}")
        except OSError as e:
            return Refusal(503, f"the adapter store is unavailable: {e}")
        async with self._swap_lock:
            # Swap and generate hold the lock together: a second request's swap in between
            # would change the weights under this request's denoising loop.
            frames = await asyncio.to_thread(self._swap_and_generate, weights, request, spec)
        data = await asyncio.to_thread(encode_video, frames_to_uint8(frames), request.format, fps=self.cfg.video.fps)
        return Video(data, SUPPORTED_FORMATS[request.format], self.adapter_loads, self.replica)

    def _swap_and_generate(self, weights: IdentityWeights | None, request: VideoRequest, spec: SampleSpec):
        from pv_ray.model.sampling import generate

        def run():
            return generate(self.backbone, request.prompt, spec, seed=request.seed, negative_prompt=self.cfg.video.negative_prompt)

        if weights is None:
            with self.adapter.disabled():
                return run()
        # `is`, not the id: an identity evicted and read again may hold newer weights.
        if self._in_adapter is not weights:
            self._in_adapter = None  # if the copy fails halfway, the next request swaps in full
            self.adapter.load_state_dict(weights.state_dict, rank=weights.rank, alpha=weights.alpha)
            self._in_adapter = weights
        return run()


# ------------------------------------------------------------------------------------- ingress


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI passes it through its body parsing untouched."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over {limit} bytes")


class RequestGuard:
    """ASGI middleware: the API key (when PV_RAY_API_KEY is set) and the request body cap."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = os.environ.get(API_KEY_ENV) or None  # read in the replica's process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(headers.get("authorization", "")):
            await _send_error(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", {"www-authenticate": "Bearer"})
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, 413, BodyTooLarge(self.max_body_bytes).detail)
            return
        received = 0

        async def capped_receive() -> Message:  # a chunked body has no content-length
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, capped_receive, send)

    def _authorized(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _send_error(send: Send, status: int, detail: str, extra_headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GenerateBody(BaseModel):
    """POST /v1/generate. Omitted fields take the server config's `video` defaults."""

    model_config = ConfigDict(extra="forbid")

    identity: str | None = Field(None, description="Identity id in the adapter store; null: the base model.")
    prompt: str = Field(description="What the video shows (at most limits.max_prompt_chars characters).")
    num_frames: int | None = Field(None, description="Frames (1..limits.max_frames); default video.num_frames.")
    num_inference_steps: int | None = Field(None, description="Denoising steps (1..limits.max_steps); default video.num_inference_steps.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed: same request and seed, same frames.")
    format: Literal["mp4", "gif"] = "mp4"


class IdentityPage(BaseModel):
    identities: list[str]
    next: str | None = Field(description="Pass as start_after for the next page; null on the last page.")


api = FastAPI(
    title="pv-ray",
    description="Videos of personalized identities (PersonalVideo adapters) from a text-to-video model.",
    version="1",
)
api.add_middleware(RequestGuard)

_VIDEO_RESPONSES = {
    200: {"content": {media_type: {} for media_type in SUPPORTED_FORMATS.values()}, "description": "The video."},
    401: {"description": "Missing or wrong API key (when the server sets PV_RAY_API_KEY)."},
    404: {"description": "No adapter for this identity in the store."},
    413: {"description": f"Request body over {MAX_BODY_BYTES} bytes."},
    422: {"description": "A limit exceeded or an invalid identity id; `detail` says which."},
    500: {"description": "The identity's adapter is unreadable (corrupt or not matching the backbone)."},
}


def _check_identity(identity_id: str) -> str:
    # Defined before `Api`: serve.ingress pickles the routes as the class is created.
    try:
        return validate_identity_id(identity_id)
    except InvalidIdentityId as e:
        raise HTTPException(422, str(e)) from None


@serve.deployment(max_ongoing_requests=100)  # only forwards; the generator sets the pace
@serve.ingress(api)
class Api:
    def __init__(self, generator: DeploymentHandle, config: dict[str, Any], store: str, storage_options: dict[str, Any] | None):
        self.generator = generator
        self.cfg = config_from_dict(config)
        self.store = AdapterStore(store, storage_options)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/identities")
    async def identities(
        self,
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        start_after: str | None = Query(None, description="The `next` of the previous page."),
    ) -> IdentityPage:
        """Identities with a complete adapter in the store, sorted, one page at a time."""
        if start_after is not None:
            _check_identity(start_after)
        ids = await asyncio.to_thread(self.store.list_identities, limit + 1, start_after)
        page = ids[:limit]
        return IdentityPage(identities=page, next=page[-1] if len(ids) > limit else None)

    @api.post("/v1/generate", response_class=Response, responses=_VIDEO_RESPONSES)
    async def generate(self, body: GenerateBody) -> Response:
        """Generate a video of `identity` (or the base model) for `prompt`."""
        video_cfg = self.cfg.video
        request = VideoRequest(
            identity=None if body.identity is None else _check_identity(body.identity),
            prompt=body.prompt,
            num_frames=body.num_frames if body.num_frames is not None else video_cfg.num_frames,
            num_inference_steps=body.num_inference_steps if body.num_inference_steps is not None else video_cfg.num_inference_steps,
            seed=body.seed,
            format=body.format,
        )
        spec = SampleSpec(request.num_frames, video_cfg.height, video_cfg.width, request.num_inference_steps, video_cfg.guidance_scale)
        try:
            check_request(self.cfg.limits, spec, request.prompt)  # refuse early, without a generator trip
        except RequestError as e:
            raise HTTPException(422, str(e)) from None
        handle = self.generator if request.identity is None else self.generator.options(multiplexed_model_id=request.identity)
        video = await handle.generate.remote(request)
        if isinstance(video, Refusal):
            raise HTTPException(video.status, video.message)
        headers = {LOADS_HEADER: str(video.adapter_loads), REPLICA_HEADER: video.replica}
        return Response(content=video.data, media_type=video.media_type, headers=headers)


# ------------------------------------------------------------------------------------ builders


def build_app(
    config_path: str,
    store: str,
    storage_options: dict[str, Any] | None = None,
    *,
    overrides: list[str] | None = None,
    max_adapters_per_replica: int = DEFAULT_MAX_ADAPTERS_PER_REPLICA,
    generator_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> Application:
    """The Serve application: `Api` ingress in front of `Generator` replicas.

    The config is read here (on the machine that builds the app) and shipped as a dict, so
    replicas need no access to the file. `generator_options` / `ingress_options` go to
    `Deployment.options` (num_replicas, autoscaling_config, ray_actor_options, ...)."""
    if max_adapters_per_replica < 1:
        raise ValueError(f"max_adapters_per_replica must be >= 1, got {max_adapters_per_replica}")
    cfg = load_config(config_path, overrides or []).model_dump()
    if "://" not in store:  # a local path must mean the same folder in every replica
        store = str(Path(store).expanduser().resolve())
    generator = Generator.options(**(generator_options or {})).bind(cfg, store, storage_options, max_adapters_per_replica)
    return Api.options(**(ingress_options or {})).bind(generator, cfg, store, storage_options)


class AppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of an application in a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    config: str
    store: str
    storage_options: dict[str, Any] | None = None
    overrides: list[str] = []  # section.key=value, as --set
    max_adapters_per_replica: int = Field(DEFAULT_MAX_ADAPTERS_PER_REPLICA, ge=1)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for `serve run serving.app:app_builder config=... store=...` and Serve configs."""
    a = AppArgs.model_validate(args)
    return build_app(a.config, a.store, a.storage_options, overrides=a.overrides, max_adapters_per_replica=a.max_adapters_per_replica)
