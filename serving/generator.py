"""The `Generator` deployment: one backbone and one injected identity adapter per replica.

Identities are Serve multiplexed models (model id = identity id): a replica keeps the weights of its
`max_adapters_per_replica` most recently used identities (LRU), and the router prefers a free
replica that already holds a request's identity (how it routes: `serving.api`'s docstring). Per
request the identity's weights are copied into the injected adapter in place, with the isolation
window that identity was tuned with, and the video is generated; a lock around swap + generate keeps
concurrent requests on one replica from seeing each other's weights, so every answer is exactly what
the request would get alone. The lock is held until the request's generation thread has returned,
whatever its client does: a request cancelled meanwhile (client gone) stops at its next denoising
step boundary, and only then does the next request swap its weights in (`_generate_alone`).

The injected adapter covers self- and cross-attention at the configured rank (`adapter.rank`, the
largest rank served): adapters of either kind fit, smaller ranks are zero-padded.

`generate` answers a request with its video; `run_job` does the same for a video job of the
board (`serving.jobs`): it reports every denoising step, stops between two steps when the job is
cancelled, and writes the video to the store under `jobs/<id>/`.

Refusals name the request's identity and a generic reason, never the store's location or an
exception's text (they hold paths and bucket names); the details go to the replica's log.
"""

# No `from __future__ import annotations`: Serve pickles these classes by value for replicas.

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from pv_ray.config import config_from_dict
from pv_ray.model.animatediff.controlnet import Control
from pv_ray.model.sampling import RequestError, SampleSpec, check_request
from pv_ray.storage.adapter_folder import (
    WEIGHTS_NAME,
    AdapterFileError,
    LoraWeights,
    backbone_mismatch,
    recorded_active_fraction,
)
from pv_ray.storage.adapter_store import (
    AdapterCorrupted,
    AdapterNotFound,
    AdapterStore,
    AdapterStoreError,
    AdapterTooLarge,
)
from pv_ray.storage.identity import InvalidIdentityId, validate_identity_id
from pv_ray.storage.personal_data import JOB_MANIFEST
from pv_ray.storage.video import SUPPORTED_FORMATS
from serving.jobs import JobCancelled, job_board
from serving.metrics import GeneratorMetrics

DEFAULT_MAX_ADAPTERS_PER_REPLICA = 4
logger = logging.getLogger("ray.serve")  # the replica's log


class GenerationCancelled(Exception):
    """Raised in a generation thread at a step boundary: its request was cancelled (client gone)."""


class AdapterOfAnotherIdentity(AdapterStoreError):
    """The adapter stored under the requested id records another identity (a copied folder, or two
    ids that one case-folding mount keeps in one folder)."""


class AdapterOfAnotherBackbone(AdapterStoreError):
    """The adapter was tuned on other backbone weights than this replica's (its adapter.json says)."""


# What a 500 says about an adapter that cannot be loaded: a reason without paths or exception texts.
_UNLOADABLE = (
    (AdapterOfAnotherIdentity, "it records another identity"),
    (AdapterOfAnotherBackbone, "it was tuned on another backbone than this server's (serve it with its own config)"),
    (AdapterCorrupted, "it is corrupt (a file does not match its recorded sha256, or its record is unreadable)"),
    (AdapterTooLarge, "it is over the store's size cap"),
    (FileNotFoundError, "a file of it is missing"),
)
_UNFIT = "its weights are not a readable safetensors file or do not fit this server's backbone and config"


@dataclass(frozen=True)
class VideoRequest:
    """A validated generation request (defaults filled in from the server config)."""

    identity: str | None
    prompt: str
    num_frames: int
    num_inference_steps: int
    seed: int
    format: str
    styles: tuple[tuple[str, float], ...] = ()  # allow-listed style LoRAs and their scales
    control: tuple[str, str, float] | None = None  # (ControlNet, conditioning clip, scale), by name


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
    lora: LoraWeights
    active_fraction: float  # the isolation window it was tuned with


# One request at a time: a replica makes one video at a time (the swap lock), so a request that
# waits does so in the caller's router, where Serve can still send it to another replica that is
# free, rather than in this replica's queue. `max_queued_requests` (set by the app) bounds that wait.
@serve.deployment(max_ongoing_requests=1)
class Generator:
    """One backbone and one injected adapter per replica; identities swapped in per request."""

    def __init__(
        self,
        config: dict[str, Any],
        store: str,
        storage_options: dict[str, Any] | None,
        max_adapters_per_replica: int,
        allow_other_backbone: bool = False,
    ):
        from pv_ray.backbones import load_backbone
        from pv_ray.model.animatediff.controlnet import load_controlnet
        from pv_ray.model.animatediff.styles import StyleLoras
        from pv_ray.model.pipeline import VideoPipeline

        self.cfg = config_from_dict(config)
        self.allow_other_backbone = allow_other_backbone
        # Cross-attention layers too: any stored identity may adapt them.
        self.pipeline = VideoPipeline.for_adapters(
            load_backbone(self.cfg.model), self.cfg.adapter, cross_attention=True
        )
        self.backbone, self.adapter = self.pipeline.backbone, self.pipeline.adapter
        self.styles = StyleLoras(self.backbone, self.adapter)
        for name, path in self.cfg.serving.styles.items():
            self.styles.load(name, path)  # resident: a request only selects them
        self.controlnets = {
            name: load_controlnet(path, self.backbone.device, self.backbone.dtype)
            for name, path in self.cfg.serving.controlnets.items()
        }
        self.store = AdapterStore(store, storage_options)
        self.board = job_board(self.cfg.serving.job_ttl_s, store, storage_options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.adapter_loads = 0
        self._swap_lock = asyncio.Lock()
        self._in_adapter: IdentityWeights | None = None  # whose weights the injected adapter holds
        self._fresh: set[int] = set()  # ids of weights just read from the store, not yet used
        self._generation_threads = 0  # running: at most one, the one holding the swap lock
        self.metrics = GeneratorMetrics()

        # Decorated here, not on the class, so the cache size is an argument of the app; Serve
        # detects a multiplexed loader stored on the instance. A plain function (not a bound
        # method) because Serve keeps its cache as an attribute of the decorated callable.
        async def load_identity_weights(identity_id: str) -> IdentityWeights:
            return await self._read_identity(identity_id)

        self._identity_weights = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(
            load_identity_weights
        )

    async def _read_identity(self, identity_id: str) -> IdentityWeights:
        """The multiplexed loader. Raising here leaves Serve's cache and the adapter untouched."""
        validate_identity_id(identity_id)  # before any store access
        started = time.perf_counter()
        record = await asyncio.to_thread(self.store.get, identity_id)
        if record.metadata.get("identity_id") != identity_id:  # exactly: "Alice" is not "alice"
            raise AdapterOfAnotherIdentity(
                f"adapter.json under {identity_id!r} records identity_id={record.metadata.get('identity_id')!r}"
            )
        other_backbone = backbone_mismatch(record.metadata, self.backbone.record)
        if other_backbone and not self.allow_other_backbone:
            raise AdapterOfAnotherBackbone(f"{identity_id}: {other_backbone}")
        data = await asyncio.to_thread(self.store.read_weights_bytes, identity_id)
        lora = LoraWeights.from_bytes(data, source=f"{identity_id}/{WEIGHTS_NAME}")
        # Checked as it is read: an unfit adapter is refused (500) and never enters Serve's cache.
        self.adapter.check_fits(lora)
        try:
            fraction = recorded_active_fraction(record.metadata, self.cfg.adapter.active_fraction)
        except ValueError as e:
            raise AdapterFileError(f"{identity_id}: {e}") from None
        self.adapter_loads += 1
        weights = IdentityWeights(identity_id, lora, fraction)
        self._fresh.add(id(weights))
        self.metrics.cache_misses.inc()
        self.metrics.load_seconds.observe(time.perf_counter() - started)
        return weights

    async def generate(self, request: VideoRequest) -> Video | Refusal:
        """The video of `request`, or why it cannot be made."""
        prepared = await self._prepare(request)
        if isinstance(prepared, Refusal):
            return prepared
        frames = await self._generate_alone(prepared, request, self._timed_steps())
        return await self._encode(frames, request)

    async def run_job(self, job_id: str, request: VideoRequest, owner: str | None) -> None:
        """Make the video of a job on the board: report each step, stop when cancelled, store the
        video under `jobs/<id>/`, record how it ended."""
        board = self.board
        if not await board.pending.remote(job_id):
            return  # cancelled while it waited for this replica: no adapter to load, no cache hit to count
        prepared = await self._prepare(request)
        if isinstance(prepared, Refusal):
            await board.finish.remote(job_id, "failed", error=f"{prepared.status}: {prepared.message}")
            return
        timed = self._timed_steps()

        def on_step(done: int, total: int) -> None:
            timed(done, total)
            if ray.get(board.progress.remote(job_id, done, total)):
                raise JobCancelled(job_id)

        try:
            # Started once it holds the replica; False: cancelled while it waited.
            frames = await self._generate_alone(prepared, request, on_step, admit=lambda: board.start.remote(job_id))
        except JobCancelled:
            await board.finish.remote(job_id, "cancelled", error="cancelled while running")
            return
        if frames is None:
            return
        video = await self._encode(frames, request)
        path = f"jobs/{job_id}/video.{request.format}"
        # job.json names whose video it is, so `pv-ray delete` finds an identity's videos, and what
        # the board needs to list the job again after a restart.
        manifest = {
            "identity": request.identity, "created": time.time(), "video": path.rsplit("/", 1)[1], "owner": owner,
            "format": request.format, "total_steps": request.num_inference_steps,
        }  # fmt: skip
        try:
            await asyncio.to_thread(self.store.root.write_json, f"jobs/{job_id}/{JOB_MANIFEST}", manifest)
            await asyncio.to_thread(self.store.root.write_bytes, path, video.data)
        except OSError as e:
            logger.warning("job %s: its video could not be written to the store: %r", job_id, e)
            await board.finish.remote(job_id, "failed", error="the video could not be written to the store")
            return
        await board.finish.remote(job_id, "done", video=path)

    async def _generate_alone(self, prepared, request: VideoRequest, on_step, admit=None):
        """Swap the request's weights, window and styles in and generate its frames in a thread, holding
        the swap lock until that thread has returned; None when `admit()` (awaited once the lock is
        held) says no.

        Cancelled meanwhile (its client went away, or its caller's task was cancelled), the request
        stops at the next denoising step boundary and the lock is released only once its thread has
        returned: a thread left running would go on denoising with this request's adapter while the
        next request swapped its own in under both. CancelledError is raised after that."""
        stop = threading.Event()
        steps_done = [0]

        def step(done: int, total: int) -> None:
            steps_done[0] = done
            on_step(done, total)
            if stop.is_set():
                raise GenerationCancelled()

        async with self._swap_lock:
            if admit is not None and not await admit():
                return None
            self._generation_threads += 1
            self.metrics.generation_threads.set(self._generation_threads)
            thread = asyncio.ensure_future(asyncio.to_thread(self._swap_and_generate, prepared, request, step))
            try:
                return await asyncio.shield(thread)
            except asyncio.CancelledError:
                stop.set()
                at_cancel = steps_done[0]
                await _until_done(thread)
                self.metrics.steps_after_cancel.observe(steps_done[0] - at_cancel)
                raise
            finally:
                # Reached only once the thread has returned (on cancel, `_until_done` waited for it).
                self._generation_threads -= 1
                self.metrics.generation_threads.set(self._generation_threads)

    async def _prepare(
        self, request: VideoRequest
    ) -> tuple[IdentityWeights | None, SampleSpec, Control | None] | Refusal:
        """The identity's weights (None: the base model), the sampling spec and the ControlNet
        conditioning, or a refusal."""
        from pv_ray.model.animatediff.controlnet import ControlError

        spec = SampleSpec(
            num_frames=request.num_frames,
            height=self.cfg.video.height,
            width=self.cfg.video.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=self.cfg.video.guidance_scale,
        )
        try:
            # The motion module's length is known only here, where the backbone is loaded.
            check_request(self.cfg.limits, spec, request.prompt, self.backbone)
            control = await asyncio.to_thread(self._control, request, spec)
            weights = None
            if request.identity is not None:
                weights = await self._identity_weights(validate_identity_id(request.identity))
                if id(weights) in self._fresh:
                    self._fresh.discard(id(weights))  # this request's read: counted as a miss
                elif not await asyncio.to_thread(self.store.exists, request.identity):
                    # Erased (`pv-ray delete`) since it was cached: its cached weights must not serve.
                    raise AdapterNotFound(f"adapter {request.identity!r} was erased since it was cached")
                else:
                    self.metrics.cache_hits.inc()
        except (RequestError, InvalidIdentityId, ControlError) as e:
            return Refusal(422, str(e))  # about the request itself (`_control` names clips, not paths)
        except AdapterNotFound as e:
            logger.info("identity %r: %s", request.identity, e)
            return Refusal(404, f"unknown identity {request.identity!r}: no adapter in the store")
        except (AdapterStoreError, AdapterFileError, FileNotFoundError, ValueError) as e:
            # FileNotFoundError: the completion mark is there but a file it lists is not. ValueError:
            # adapter metadata out of range.
            logger.warning("adapter %r cannot be loaded: %s: %s", request.identity, type(e).__name__, e)
            why = next((reason for kind, reason in _UNLOADABLE if isinstance(e, kind)), _UNFIT)
            return Refusal(500, f"adapter {request.identity!r} cannot be loaded: {why}")
        except OSError as e:
            logger.warning("the adapter store is unavailable: %s: %s", type(e).__name__, e)
            return Refusal(503, "the adapter store is unavailable; try again later")
        return weights, spec, control

    def _control(self, request: VideoRequest, spec: SampleSpec) -> Control | None:
        """The request's ControlNet conditioning, from the allow-listed net and clip folder."""
        from pv_ray.model.animatediff.controlnet import Control, ControlError, find_control_clip, read_control_frames

        if request.control is None:
            return None
        net_name, clip_name, scale = request.control
        if net_name not in self.controlnets or self.cfg.serving.control_clips is None:
            raise ControlError(
                f"unknown ControlNet {net_name!r} (serving.controlnets: {', '.join(self.controlnets) or 'none'})"
            )
        folder = Path(self.cfg.serving.control_clips)
        clip = None
        try:
            clip = find_control_clip(folder, clip_name)
            frames = read_control_frames(clip, spec.num_frames, spec.height, spec.width)
        except ControlError as e:
            # The message names the server's folders (and the CLI's options): the client gets the
            # clip's name instead.
            message = str(e).replace(f" in {folder}", "").replace("--control ", "control clip ")
            if clip is not None:
                message = message.replace(str(clip), repr(clip_name))
            message = message.replace(str(folder), "serving.control_clips").replace("(--frames)", "(num_frames)")
            raise ControlError(message) from None
        return Control(self.controlnets[net_name], frames.to(self.backbone.device), scale)

    async def _encode(self, frames, request: VideoRequest) -> Video:
        from pv_ray.storage.video import encode_video, frames_to_uint8

        data = await asyncio.to_thread(encode_video, frames_to_uint8(frames), request.format, fps=self.cfg.video.fps)
        return Video(data, SUPPORTED_FORMATS[request.format], self.adapter_loads, self.replica)

    def _timed_steps(self):
        """A step callback that records each denoising step's seconds."""
        last = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            last[0] = now

        return on_step

    def _swap_and_generate(self, prepared, request: VideoRequest, on_step):
        weights, spec, control = prepared
        self.styles.use(dict(request.styles))

        def run():
            negative = self.cfg.video.negative_prompt
            return self.pipeline(
                request.prompt, spec, seed=request.seed, negative_prompt=negative, on_step=on_step, control=control
            )

        if weights is None:
            with self.pipeline.base_model():
                return run()
        # `is`, not the id: an identity evicted and read again may hold newer weights.
        if self._in_adapter is not weights:
            self._in_adapter = None  # if the copy fails halfway, the next request swaps in full
            started = time.perf_counter()
            self.pipeline.use_identity(weights.lora, weights.active_fraction)
            self.metrics.swap_seconds.observe(time.perf_counter() - started)
            self._in_adapter = weights
        return run()


async def _until_done(future: asyncio.Future) -> None:
    """Wait until `future` is done, whatever it raises and however often the waiting task is
    cancelled meanwhile (`asyncio.wait` never cancels what it waits for)."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: GenerationCancelled is the expected end, not an error to report
