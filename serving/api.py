"""The `Api` deployment: the FastAPI ingress in front of the generator replicas.

It validates requests (limits, identity ids; the body cap and API key are `RequestGuard`'s),
lists the identities of the store, forwards generation to a `Generator` replica holding the
identity (Serve's multiplexed routing) and maps refusals to HTTP statuses.
"""

# No `from __future__ import annotations`: Serve rebuilds the ingress routes outside this
# module, where FastAPI could not resolve string annotations such as 'GenerateBody'.

import asyncio
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from pv_ray.config import config_from_dict
from pv_ray.model.sampling import RequestError, SampleSpec, check_request
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.identity import InvalidIdentityId, validate_identity_id
from pv_ray.storage.video import SUPPORTED_FORMATS
from serving.generator import Refusal, VideoRequest
from serving.guard import MAX_BODY_BYTES, RequestGuard

MAX_PAGE = 1000
LOADS_HEADER = "x-pv-ray-adapter-loads"  # adapters this replica has read from the store so far
REPLICA_HEADER = "x-pv-ray-replica"


class GenerateBody(BaseModel):
    """POST /v1/generate. Omitted fields take the server config's `video` defaults."""

    model_config = ConfigDict(extra="forbid")

    identity: str | None = Field(None, description="Identity id in the adapter store; null: the base model.")
    prompt: str = Field(description="What the video shows (at most limits.max_prompt_chars characters).")
    num_frames: int | None = Field(None, description="Frames (1..limits.max_frames); default video.num_frames.")
    num_inference_steps: int | None = Field(
        None, description="Denoising steps (1..limits.max_steps); default video.num_inference_steps."
    )
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
    def __init__(
        self, generator: DeploymentHandle, config: dict[str, Any], store: str, storage_options: dict[str, Any] | None
    ):
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
            num_inference_steps=body.num_inference_steps
            if body.num_inference_steps is not None
            else video_cfg.num_inference_steps,
            seed=body.seed,
            format=body.format,
        )
        spec = SampleSpec(
            request.num_frames, video_cfg.height, video_cfg.width, request.num_inference_steps, video_cfg.guidance_scale
        )
        try:
            check_request(self.cfg.limits, spec, request.prompt)  # refuse early, without a generator trip
        except RequestError as e:
            raise HTTPException(422, str(e)) from None
        handle = (
            self.generator
            if request.identity is None
            else self.generator.options(multiplexed_model_id=request.identity)
        )
        video = await handle.generate.remote(request)
        if isinstance(video, Refusal):
            raise HTTPException(video.status, video.message)
        headers = {LOADS_HEADER: str(video.adapter_loads), REPLICA_HEADER: video.replica}
        return Response(content=video.data, media_type=video.media_type, headers=headers)
