"""The `Api` deployment: the FastAPI ingress in front of the generator replicas.

It validates requests (limits, identity ids; the body cap and API key are `RequestGuard`'s),
lists the identities of the store, forwards generation to a `Generator` replica and maps refusals
to HTTP statuses. Video jobs (`/v1/jobs`) go through the same validation; their records live on
the application's job board (`serving.jobs`), their videos in the store. The web page (`/`) is
static HTML and JavaScript shipped in `serving/page/`, which use these same routes.

Routing. A generator replica takes one request at a time (`max_ongoing_requests=1`), so Serve's
multiplexed router sends an identity request to a free replica that already holds the identity,
else to a free replica with the fewest identities loaded (which reads the adapter from the store:
milliseconds, where waiting for the busy holder costs whole videos). When every replica is busy
the request waits here, in this replica's router, and goes to the first replica that frees;
that wait is what Serve's autoscaler counts, so identity traffic makes it add replicas and the
added replicas serve it.

Bounds. Nothing waits without limit, and `/healthz` never waits behind generation (this replica
accepts up to `MAX_ONGOING` requests at once; they only await):
- `POST /v1/generate`: at most `serving.max_waiting_requests` wait for a generator; past that
  503 at once, and 503 after `serving.request_timeout_s`; both with Retry-After;
- `POST /v1/jobs`: 429 past `serving.max_queued_jobs` queued jobs; queued jobs take at most half
  of the waiting places, so synchronous requests are never starved by a long queue of jobs;
- `GET /v1/jobs/{id}/events`: 429 past `serving.max_event_streams_per_key` open streams per key;
- past `MAX_ONGOING` open requests Serve's proxy answers 503 with Retry-After itself.
A background loop renews this replica's lease on the job board every few seconds (taking over
the queued jobs of ingress replicas that died) and deletes expired videos.
"""

# No `from __future__ import annotations`: Serve rebuilds the ingress routes outside this
# module, where FastAPI could not resolve string annotations such as 'GenerateBody'.

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import ray
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pv_ray.config import config_from_dict
from pv_ray.model.animatediff.controlnet import list_control_clips
from pv_ray.model.sampling import RequestError, SampleSpec, check_request
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.identity import InvalidIdentityId, validate_identity_id
from pv_ray.storage.video import SUPPORTED_FORMATS
from serving.generator import Refusal, VideoRequest
from serving.guard import MAX_BODY_BYTES, RequestGuard, bearer_token
from serving.jobs import FINISHED, LEASE_S, job_board, new_job_id, owner_of

MAX_PAGE = 1000
LOADS_HEADER = "x-pv-ray-adapter-loads"  # adapters this replica has read from the store so far
REPLICA_HEADER = "x-pv-ray-replica"
PAGE = Path(__file__).resolve().parent / "page"
PAGE_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
MAX_VIDEO_BYTES = 512 << 20
EVENTS_POLL_S = 0.5
MAX_ONGOING = 1000  # requests this replica holds at once (each only awaits); past that the proxy answers 503
BOARD_TIMEOUT_S = 10.0  # a job board call slower than this: 503 (the board is restarting, or its node gone)
EXPIRE_EVERY_S = 60.0  # how often expired videos are deleted
JOB_RETRY_S = 2.0  # a job that found the generators' waiting places full tries again after this
logger = logging.getLogger("ray.serve")  # the replica's log


MAX_STYLES = 4


class StyleChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A style of GET /v1/styles (serving.styles).")
    scale: float = Field(1.0, ge=-4, le=4, description="How strongly the style LoRA applies.")


class ControlChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    controlnet: str = Field(description="A ControlNet of GET /v1/styles (serving.controlnets).")
    clip: str = Field(description="A conditioning clip of GET /v1/styles (serving.control_clips), one frame per frame.")
    scale: float = Field(1.0, ge=0, le=4, description="ControlNet conditioning scale.")


class GenerateBody(BaseModel):
    """POST /v1/generate and POST /v1/jobs. Omitted fields take the server config's `video` defaults."""

    model_config = ConfigDict(extra="forbid")

    identity: str | None = Field(None, description="Identity id in the adapter store; null: the base model.")
    prompt: str = Field(description="What the video shows (at most limits.max_prompt_chars characters).")
    num_frames: int | None = Field(None, description="Frames (1..limits.max_frames); default video.num_frames.")
    num_inference_steps: int | None = Field(
        None, description="Denoising steps (1..limits.max_steps); default video.num_inference_steps."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed: same request and seed, same frames.")
    format: Literal["mp4", "gif"] = "mp4"
    styles: list[StyleChoice] = Field([], max_length=MAX_STYLES, description="Style LoRAs applied with the identity.")
    control: ControlChoice | None = Field(None, description="Condition every frame on a ControlNet and a clip.")


class Defaults(BaseModel):
    num_frames: int = Field(description="What an omitted num_frames takes (video.num_frames).")
    num_inference_steps: int = Field(description="What an omitted num_inference_steps takes.")
    max_frames: int = Field(description="limits.max_frames")
    max_steps: int = Field(description="limits.max_steps")
    max_prompt_chars: int = Field(description="limits.max_prompt_chars")


class IdentityPage(BaseModel):
    identities: list[str]
    next: str | None = Field(description="Pass as start_after for the next page; null on the last page.")


class Components(BaseModel):
    styles: list[str]
    controlnets: list[str]
    control_clips: list[str]


class JobAccepted(BaseModel):
    id: str = Field(description="The job's id (unguessable).")
    status_url: str


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    step: int = Field(description="Denoising steps done.")
    total_steps: int
    eta_s: float | None = Field(description="Seconds until done, estimated; null when unknown.")
    position: int | None = Field(description="Jobs ahead in the queue (0: next); null unless queued.")
    error: str | None
    video_url: str | None = Field(description="Where the video is, once done.")


api = FastAPI(
    title="pv-ray",
    description="Videos of personalized identities (PersonalVideo adapters) from a text-to-video model.",
    version="1",
)
api.add_middleware(RequestGuard)


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body or query that does not fit the schema: 422 `{"detail": reason}` as for every other
    refusal (FastAPI's default is a list of objects), one `field: message` per problem."""
    problems = []
    for e in error.errors():
        where = ".".join(map(str, e["loc"][1:])) or str(e["loc"][0])  # ("body", "styles", 0, "scale"): styles.0.scale
        problems.append(f"{where}: {e['msg']}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


_VIDEO_RESPONSES = {
    200: {"content": {media_type: {} for media_type in SUPPORTED_FORMATS.values()}, "description": "The video."},
    401: {"description": "Missing or wrong API key (when the server sets PV_RAY_API_KEY)."},
    404: {"description": "No adapter for this identity in the store."},
    413: {"description": f"Request body over {MAX_BODY_BYTES} bytes."},
    422: {"description": "A limit exceeded or an invalid identity id; `detail` says which."},
    500: {"description": "The identity's adapter is unusable (corrupt, another identity's, unfit for the backbone)."},
    503: {
        "description": "The adapter store cannot be reached, every generator is busy with "
        "serving.max_waiting_requests waiting, or the video took over serving.request_timeout_s; "
        "Retry-After says when to try again."
    },
}


# The helpers are defined before `Api`: serve.ingress pickles the routes as the class is created.
def _check_identity(identity_id: str) -> str:
    try:
        return validate_identity_id(identity_id)
    except InvalidIdentityId as e:
        raise HTTPException(422, str(e)) from None


def _check_allowed(kind: str, names: list[str], allowed: dict, setting: str) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        listed = ", ".join(sorted(allowed)) or "none configured"
        raise HTTPException(422, f"unknown {kind} {', '.join(map(repr, unknown))} ({setting}: {listed})")


def _unknown_job(job_id: str) -> HTTPException:
    return HTTPException(404, f"unknown job {job_id!r}")


def _owner(http: Request) -> str | None:
    return owner_of(bearer_token(http.headers.get("authorization", "")))


def _root(http: Request) -> str:
    return http.scope.get("root_path", "")


def _busy(message: str, retry_after_s: float) -> HTTPException:
    return HTTPException(503, message, headers={"Retry-After": str(max(1, round(retry_after_s)))})


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING,
    max_queued_requests=MAX_ONGOING,
    backpressure_config={"status_code": 503, "retry_after_s": 5},
)
@serve.ingress(api)
class Api:
    def __init__(
        self, generator: DeploymentHandle, config: dict[str, Any], store: str, storage_options: dict[str, Any] | None
    ):
        self.generator = generator
        self.cfg = config_from_dict(config)
        self.store = AdapterStore(store, storage_options)
        self.board = job_board(self.cfg.serving.job_ttl_s, store, storage_options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._running: set[asyncio.Task] = set()  # job dispatches and the maintenance loop
        # Queued jobs take at most half of the places waiting for a generator (see the module docstring).
        self._job_places = asyncio.Semaphore(max(1, self.cfg.serving.max_waiting_requests // 2))
        self._streams: dict[str | None, int] = {}  # open event streams per owner
        self._durations: deque[float] = deque(maxlen=20)  # seconds of the last generations answered
        self._spawn(self._maintain())

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: pick an identity, describe the video, watch it being made."""
        return HTMLResponse((PAGE / "index.html").read_text())

    @api.get("/page/{name}", include_in_schema=False)
    async def page_file(self, name: str) -> Response:
        if name not in PAGE_FILES:
            raise HTTPException(404, f"no page file {name!r}")
        return Response((PAGE / name).read_bytes(), media_type=PAGE_FILES[name])

    @api.get("/v1/identities")
    async def identities(
        self,
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        start_after: str | None = Query(None, description="The `next` of the previous page."),
        contains: str | None = Query(None, max_length=128, description="Only ids containing this text."),
    ) -> IdentityPage:
        """Identities with a complete adapter in the store, sorted, one page at a time."""
        if start_after is not None:
            _check_identity(start_after)
        if contains:
            everyone = await asyncio.to_thread(self.store.list_identities, None, start_after)
            ids = [i for i in everyone if contains.lower() in i.lower()][: limit + 1]
        else:
            ids = await asyncio.to_thread(self.store.list_identities, limit + 1, start_after)
        page = ids[:limit]
        return IdentityPage(identities=page, next=page[-1] if len(ids) > limit else None)

    @api.get("/v1/defaults")
    async def defaults(self) -> Defaults:
        """The values an omitted field takes and the limits a request must keep (the page starts from them)."""
        video, limits = self.cfg.video, self.cfg.limits
        return Defaults(
            num_frames=video.num_frames,
            num_inference_steps=video.num_inference_steps,
            max_frames=limits.max_frames,
            max_steps=limits.max_steps,
            max_prompt_chars=limits.max_prompt_chars,
        )

    @api.get("/v1/styles")
    async def components(self) -> Components:
        """The style LoRAs, ControlNets and conditioning clips a request may name."""
        serving = self.cfg.serving
        clips = await asyncio.to_thread(list_control_clips, serving.control_clips)
        return Components(styles=sorted(serving.styles), controlnets=sorted(serving.controlnets), control_clips=clips)

    @api.post("/v1/generate", response_class=Response, responses=_VIDEO_RESPONSES)
    async def generate(self, body: GenerateBody) -> Response:
        """Generate a video of `identity` (or the base model) for `prompt`."""
        request = self._video_request(body)
        timeout_s, started = self.cfg.serving.request_timeout_s, time.monotonic()
        response = self._handle(request).generate.remote(request)
        try:
            video = await asyncio.wait_for(response, timeout_s)
        except BackPressureError:
            raise self._all_busy() from None
        except TimeoutError:
            response.cancel()  # the replica stops it at its next denoising step
            raise _busy(
                f"the video was not ready within serving.request_timeout_s ({timeout_s:g} s); "
                "try again later or submit a job (POST /v1/jobs)",
                self._typical_s(),
            ) from None
        self._durations.append(time.monotonic() - started)
        if isinstance(video, Refusal):
            raise HTTPException(video.status, video.message)
        headers = {LOADS_HEADER: str(video.adapter_loads), REPLICA_HEADER: video.replica}
        return Response(content=video.data, media_type=video.media_type, headers=headers)

    @api.post("/v1/jobs", status_code=202)
    async def submit_job(self, body: GenerateBody, http: Request) -> JobAccepted:
        """Queue a video job (the body of /v1/generate); follow it at `status_url`."""
        request = self._video_request(body)
        job_id, owner = new_job_id(), _owner(http)
        queued = self.cfg.serving.max_queued_jobs
        if not await self._ask_board(self.board.submit, job_id, owner, request, queued, self.replica):
            retry = await self._ask_board(self.board.retry_after_s)
            detail = f"the job queue is full ({queued} queued, serving.max_queued_jobs); try again later"
            raise HTTPException(429, detail, headers={"Retry-After": str(retry)})
        self._spawn(self._dispatch(job_id, request, owner))
        return JobAccepted(id=job_id, status_url=f"{_root(http)}/v1/jobs/{job_id}")

    @api.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str, http: Request) -> JobStatus:
        """A job's status, progress (denoising steps), place in the queue, and its video once done."""
        return self._status(await self._view(job_id, http), http)

    @api.get("/v1/jobs/{job_id}/video", response_class=Response, responses={200: _VIDEO_RESPONSES[200]})
    async def job_video(self, job_id: str, http: Request) -> Response:
        view = await self._view(job_id, http)
        if view["status"] != "done":
            raise HTTPException(409, f"job {job_id!r} is {view['status']}: no video")
        data = await asyncio.to_thread(self.store.root.read_bytes, view["video"], MAX_VIDEO_BYTES)
        return Response(content=data, media_type=SUPPORTED_FORMATS[view["format"]])

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, http: Request) -> JobStatus:
        """Cancel a queued job, or a running one between two denoising steps."""
        if await self._ask_board(self.board.cancel, job_id, _owner(http)) is None:
            raise _unknown_job(job_id)
        return self._status(await self._view(job_id, http), http)

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str, http: Request) -> StreamingResponse:
        """The job's status as Server-Sent Events: one `data:` line per change, until it ends."""
        first = await self._view(job_id, http)
        owner, cap = _owner(http), self.cfg.serving.max_event_streams_per_key
        if self._streams.get(owner, 0) >= cap:
            detail = f"{cap} event streams are open for this key (serving.max_event_streams_per_key); close one first"
            raise HTTPException(429, detail, headers={"Retry-After": str(round(EVENTS_POLL_S * 10))})
        self._streams[owner] = self._streams.get(owner, 0) + 1

        async def events():
            view, last = first, None
            try:
                while True:
                    status = self._status(view, http).model_dump_json()
                    if status != last:
                        yield f"data: {status}\n\n"
                        last = status
                    if view["status"] in FINISHED:
                        return
                    await asyncio.sleep(EVENTS_POLL_S)
                    view = await self._view(job_id, http)
            finally:  # the job ended, or the client went away (the stream is cancelled)
                self._streams[owner] -= 1
                if not self._streams[owner]:
                    del self._streams[owner]

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    # ------------------------------------------------------------------------- helpers

    def _video_request(self, body: GenerateBody) -> VideoRequest:
        """The body validated against the limits (refused early, without a generator trip)."""
        video_cfg = self.cfg.video
        steps = body.num_inference_steps if body.num_inference_steps is not None else video_cfg.num_inference_steps
        request = VideoRequest(
            identity=None if body.identity is None else _check_identity(body.identity),
            prompt=body.prompt,
            num_frames=body.num_frames if body.num_frames is not None else video_cfg.num_frames,
            num_inference_steps=steps,
            seed=body.seed,
            format=body.format,
            styles=tuple((choice.name, choice.scale) for choice in body.styles),
            control=None if body.control is None else (body.control.controlnet, body.control.clip, body.control.scale),
        )
        _check_allowed("style", [c.name for c in body.styles], self.cfg.serving.styles, "serving.styles")
        if body.control is not None:
            _check_allowed("ControlNet", [body.control.controlnet], self.cfg.serving.controlnets, "serving.controlnets")
        spec = SampleSpec(
            request.num_frames, video_cfg.height, video_cfg.width, request.num_inference_steps, video_cfg.guidance_scale
        )
        try:
            check_request(self.cfg.limits, spec, request.prompt)
        except RequestError as e:
            raise HTTPException(422, str(e)) from None
        return request

    def _handle(self, request: VideoRequest) -> DeploymentHandle:
        if request.identity is None:
            return self.generator
        return self.generator.options(multiplexed_model_id=request.identity)

    def _spawn(self, coroutine) -> None:
        """Run in the background, kept referenced until done (asyncio holds tasks weakly)."""
        task = asyncio.ensure_future(coroutine)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _dispatch(self, job_id: str, request: VideoRequest, owner: str | None) -> None:
        """Hand a queued job to a generator replica once it has a waiting place; record it as failed
        if that call fails."""
        async with self._job_places:
            try:
                while await self.board.pending.remote(job_id):  # not cancelled meanwhile
                    try:
                        await self._handle(request).run_job.remote(job_id, request, owner)
                        return
                    except BackPressureError:  # the places filled with synchronous requests meanwhile
                        await asyncio.sleep(JOB_RETRY_S)
            except Exception as e:  # the replica died, or a call failed: the job must not stay queued or running
                # The error's text (node addresses, paths, a traceback) stays in this replica's log.
                logger.warning("job %s: its generator call failed: %s: %s", job_id, type(e).__name__, e)
                with contextlib.suppress(Exception):  # the board itself may be what failed
                    await self.board.finish.remote(job_id, "failed", error="the generator replica running it failed")

    async def _maintain(self) -> None:
        """Every few seconds: renew this replica's lease on the job board, dispatching the queued jobs
        it takes over from ingress replicas that died; now and then delete expired videos."""
        expired_at = 0.0
        while True:
            try:
                for job_id, request, owner in await self.board.renew.remote(self.replica):
                    logger.info("job %s: taken over from an ingress replica that is gone", job_id)
                    self._spawn(self._dispatch(job_id, request, owner))
                if time.monotonic() - expired_at > EXPIRE_EVERY_S:
                    await self._expire()
                    expired_at = time.monotonic()
            except Exception as e:  # the board restarting, or the store unreachable: next round
                logger.warning("job board maintenance failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(LEASE_S / 3)

    async def _ask_board(self, method, *args) -> Any:
        """A job board call answered within `BOARD_TIMEOUT_S`, else 503."""
        try:
            return await asyncio.wait_for(method.remote(*args), BOARD_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError) as e:
            logger.warning("job board call failed: %s: %s", type(e).__name__, e)
            raise _busy("the job board is unavailable; try again later", BOARD_TIMEOUT_S) from None

    def _typical_s(self) -> float:
        """Seconds a generation took lately here: a client's wait before trying again."""
        return sum(self._durations) / len(self._durations) if self._durations else 10.0

    def _all_busy(self) -> HTTPException:
        waiting = self.cfg.serving.max_waiting_requests
        return _busy(
            f"every generator replica is busy and {waiting} requests wait (serving.max_waiting_requests); "
            "try again later or submit a job (POST /v1/jobs)",
            self._typical_s(),
        )

    async def _view(self, job_id: str, http: Request) -> dict[str, Any]:
        view = await self._ask_board(self.board.view, job_id, _owner(http))
        if view is None:
            raise _unknown_job(job_id)
        return view

    def _status(self, view: dict[str, Any], http: Request) -> JobStatus:
        fields = {k: view[k] for k in ("id", "status", "step", "total_steps", "eta_s", "position", "error")}
        video_url = f"{_root(http)}/v1/jobs/{view['id']}/video" if view["status"] == "done" else None
        return JobStatus(**fields, video_url=video_url)

    async def _expire(self) -> None:
        """Delete the videos of jobs past their TTL (their records go with them)."""
        for path in await self.board.expired.remote():
            await asyncio.to_thread(self.store.root.delete, path.rsplit("/", 1)[0])
