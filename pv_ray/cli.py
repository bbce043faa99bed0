"""The `pv-ray` command line. Thin: parse, validate, call the library, show progress.

Exit codes: 2 for input errors (bad config, missing model folder, bad request, unusable photos:
one line on stderr); 1 for a tuning that produced no usable adapter or storage that kept failing
(one line naming the step or operation). Anything else is a bug and keeps its traceback.
PV_RAY_DEBUG=1 shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pv_ray.errors import InputError, TuningFailed
from pv_ray.terminal import terminal_safe

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Personalize a text-to-video model to many identities, on Ray."
)
models_app = typer.Typer(no_args_is_help=True, help="Model folders (the tiny preset).")
app.add_typer(models_app, name="models")
console = Console(stderr=True, emoji=False)  # a ":name:" in a user's file name stays as written

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: the packaged tiny-prior.yaml).")
]
# Where adapters exist, no --config means the config they were tuned with (adapter.json records it).
RecordedConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (default: the one the adapters were tuned with)."),
]
OtherBackboneOpt = Annotated[
    bool,
    typer.Option(
        "--allow-other-backbone",
        help="Run adapters on a backbone other than the one they were tuned on (refused by default).",
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
]
TRACKING_ENV = "PV_RAY_TRACKING_URI"  # --tracking-uri from the environment (e.g. a Kubernetes Secret)
StoreOpt = Annotated[str, typer.Option(help="Adapter store root: path or URI (the --output of personalize).")]


@contextmanager
def user_errors():
    """Input errors and failed runs become one clear line and a non-zero exit; bugs keep their traceback."""
    from pv_ray.storage.root import StorageUnavailable

    try:
        yield
    except (InputError, TuningFailed, StorageUnavailable) as e:
        if os.environ.get("PV_RAY_DEBUG"):
            raise
        label = "error" if isinstance(e, InputError) else "failed"
        console.print(f"[bold red]{label}:[/] {terminal_safe(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(e, InputError) else 1) from None


def quiet_libraries() -> None:
    """Keep the terminal for pv-ray's own progress: the model libraries and MLflow are chatty.
    Only their own deprecation chatter is filtered; warnings from elsewhere still show."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    for module in (
        "diffusers",
        "transformers",
        "peft",
        "huggingface_hub",
        "torch.utils.checkpoint",
        "insightface",
        "onnxruntime",
    ):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow resets its logger's level when imported
    for name in ("ray", "ray.train", "ray.data", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def progress_bar(*fields, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), *fields, TimeElapsedColumn(), console=console
    )


@models_app.command("init-tiny")
def init_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the tiny pipeline into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights (same seed, identical files).")] = 0,
    family: Annotated[
        str, typer.Option(help="animatediff, wan (Wan 2.1's layout) or wan2.2 (two experts).")
    ] = "animatediff",
) -> None:
    """Write a tiny preset: an AnimateDiff pipeline folder plus motion_adapter/ and faces/, or a
    diffusers Wan folder plus faces/ (--family wan, wan2.2)."""
    with user_errors():
        quiet_libraries()
        if family not in ("animatediff", "wan", "wan2.2"):
            raise InputError(f"--family {family!r}: expected animatediff, wan or wan2.2")
        if out.exists() and any(out.iterdir()):
            raise InputError(f"--out {out} exists and is not empty")
        if family == "animatediff":
            from pv_ray.presets.tiny import build_tiny_models

            build_tiny_models(out, seed=seed)
        else:
            from pv_ray.presets.tiny_wan import build_tiny_wan_models

            build_tiny_wan_models(out, seed=seed, version="2.2" if family == "wan2.2" else "2.1")
        console.print(f"tiny {family} models written to [bold]{terminal_safe(out)}[/]")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="What the video shows.")],
    out: Annotated[Path, typer.Option(help="Output file: .mp4 or .gif.")],
    frames: Annotated[int | None, typer.Option(help="Number of frames (default: video.num_frames).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: video.num_inference_steps).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: same seed, same frames.")] = 0,
    adapter: Annotated[
        Path | None, typer.Option(help="Identity adapter folder (pytorch_lora_weights.safetensors).")
    ] = None,
    style_lora: Annotated[
        list[str] | None,
        typer.Option(help="A style LoRA (.safetensors, diffusers or kohya keys) as FILE[:SCALE]; repeatable."),
    ] = None,
    controlnet: Annotated[Path | None, typer.Option(help="SD1.5 ControlNet folder (diffusers format).")] = None,
    control: Annotated[
        Path | None, typer.Option(help="Conditioning clip for --controlnet: a video, or a folder of images.")
    ] = None,
    control_scale: Annotated[float, typer.Option(help="ControlNet conditioning scale.")] = 1.0,
    config: RecordedConfigOpt = None,
    allow_other_backbone: OtherBackboneOpt = False,
    set_: SetOpt = None,
) -> None:
    """Generate one video, with the base model or an identity adapter, style LoRAs and a ControlNet."""
    with user_errors():
        from pv_ray.config import given_or_recorded_config
        from pv_ray.model.animatediff.controlnet import read_control_frames
        from pv_ray.model.animatediff.styles import parse_style_option
        from pv_ray.model.sampling import SampleSpec, check_request
        from pv_ray.storage.video import resolve_format

        cfg = given_or_recorded_config(config, set_, _recorded_config(adapter) if adapter is not None else None)
        fmt = resolve_format(out)  # refuse an unsupported extension before any model loads
        spec = SampleSpec(
            num_frames=frames if frames is not None else cfg.video.num_frames,
            height=cfg.video.height,
            width=cfg.video.width,
            num_inference_steps=steps if steps is not None else cfg.video.num_inference_steps,
            guidance_scale=cfg.video.guidance_scale,
        )
        check_request(cfg.limits, spec, prompt)
        if (controlnet is None) != (control is None):
            raise InputError("--controlnet and --control go together: the ControlNet folder and its conditioning clip")
        control_frames = read_control_frames(control, spec.num_frames, spec.height, spec.width) if control else None
        styles = [parse_style_option(text) for text in style_lora or []]
        quiet_libraries()
        with console.status("loading the backbone"):
            pipeline, conditioning = _generation_pipeline(
                cfg, adapter, styles, controlnet, control_frames, control_scale, allow_other_backbone
            )
        check_request(cfg.limits, spec, prompt, pipeline.backbone)

        from contextlib import nullcontext

        from pv_ray.storage.video import frames_to_uint8, write_video

        with progress_bar(description="denoising") as progress, nullcontext() if adapter else pipeline.base_model():
            task = progress.add_task("denoise", total=spec.num_inference_steps)
            video = pipeline(
                prompt,
                spec,
                seed=seed,
                negative_prompt=cfg.video.negative_prompt,
                control=conditioning,
                on_step=lambda done, total: progress.update(task, completed=done),
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(frames_to_uint8(video), out, fps=cfg.video.fps, format=fmt)
        console.print(f"wrote {spec.num_frames} frames ({spec.width}x{spec.height}) to [bold]{terminal_safe(out)}[/]")


def _generation_pipeline(cfg, adapter_dir, styles, controlnet_dir, control_frames, control_scale, any_backbone):
    """The pipeline holding the identity adapter (if any) with the style LoRAs on, and the
    ControlNet conditioning (or None)."""
    from pv_ray.backbones import load_backbone
    from pv_ray.model.animatediff.controlnet import Control, load_controlnet
    from pv_ray.model.animatediff.styles import StyleLoras
    from pv_ray.model.pipeline import VideoPipeline
    from pv_ray.storage.adapter_folder import LoraWeights

    weights = LoraWeights.read(adapter_dir) if adapter_dir is not None else None
    backbone = load_backbone(cfg.model)
    if adapter_dir is not None and not any_backbone:
        _refuse_other_backbone(Path(adapter_dir), backbone.record)
    recorded = [{"rank": weights.rank}] if weights is not None else []
    cross_attention = weights is not None and any(".attn2." in k for k in weights.tensors)
    pipeline = VideoPipeline.for_adapters(backbone, cfg.adapter, recorded, cross_attention=cross_attention)
    if weights is not None:
        pipeline.use_identity(weights, cfg.adapter.active_fraction)
    if styles:
        loras = StyleLoras(backbone, pipeline.adapter)
        for i, (path, _) in enumerate(styles):
            loras.load(f"style{i}", path)
        loras.use({f"style{i}": scale for i, (_, scale) in enumerate(styles)})
    conditioning = None
    if controlnet_dir is not None:
        conditioning = Control(
            load_controlnet(controlnet_dir, backbone.device, backbone.dtype), control_frames, control_scale
        )
    return pipeline, conditioning


def _adapter_metadata(adapter: Path) -> tuple[dict, Path] | None:
    """adapter.json of an --adapter (in its folder, or beside its file) and its path; None for a bare
    weights file (e.g. one exported elsewhere) or an unreadable record."""
    from pv_ray.storage.adapter_folder import AdapterFolder

    folder = AdapterFolder(adapter if adapter.is_dir() else adapter.parent)
    metadata = folder.metadata()
    return None if metadata is None else (metadata, folder.metadata_path)


def _recorded_config(adapter: Path) -> tuple[dict, str] | None:
    """The config an --adapter was tuned with and where it is recorded (None: not recorded)."""
    from pv_ray.storage.adapter_folder import recorded_config

    found = _adapter_metadata(adapter)
    config = recorded_config(found[0]) if found else None
    return None if config is None else (config, str(found[1]))


def _refuse_other_backbone(adapter: Path, backbone: dict[str, str]) -> None:
    """An adapter whose adapter.json records other backbone weights than this config's: one line,
    before a video is made of noise."""
    from pv_ray.storage.adapter_folder import backbone_mismatch

    found = _adapter_metadata(adapter)
    why = backbone_mismatch(found[0], backbone) if found else None
    if why:
        raise InputError(
            f"--adapter {adapter}: {why}; leave out --config to use the one it was tuned with "
            "(or pass --allow-other-backbone)"
        )


@app.command()
def tune(
    images: Annotated[
        str, typer.Option(help="Folder (path or URI) with 1..N photos of the person, optional meta.json.")
    ],
    identity: Annotated[str, typer.Option(help="Identity id: letters, digits, . _ - (max 128).")],
    out: Annotated[Path | None, typer.Option(help="Adapter folder to write (or give --store).")] = None,
    store: Annotated[
        str | None,
        typer.Option(help="Adapter store (path or URI) to put the adapter in, to serve or export it (or give --out)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the identity's adapter already in --store.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Tune one identity's spatial adapter from its photos (no Ray needed)."""
    with user_errors():
        from pv_ray.config import load_config, packaged_config
        from pv_ray.prompts import IdentityMeta
        from pv_ray.storage.identity import validate_identity_id
        from pv_ray.storage.identity_folders import read_identity_folder

        if (out is None) == (store is None):
            raise InputError("give --out DIR (an adapter folder) or --store URI (an adapter store), one of them")
        cfg = load_config(config or packaged_config(), set_ or [])
        validate_identity_id(identity)
        adapter_store = _store_to_tune_into(store, identity, cfg, force) if store is not None else None
        folder = read_identity_folder(
            identity,
            images,
            max_photo_bytes=cfg.faces.max_photo_bytes,
            max_photos=cfg.faces.max_photos_per_identity,
            max_total_bytes=cfg.faces.max_identity_bytes,
        )  # an unreadable folder, like a bad meta.json or no usable photo below, is an InputError: one line
        meta = IdentityMeta.parse(folder.meta, f"{images}/meta.json") if folder.meta is not None else None
        quiet_libraries()
        from rich.progress import TextColumn, TimeRemainingColumn

        from pv_ray.method.personalizer import Personalizer

        with console.status("loading the backbone and the face models"):
            personalizer = Personalizer(cfg)
        reference = personalizer.reference(folder.photos)  # IdentityRejected lists each photo's reason
        for name, reason in [(p.name, p.reason) for p in reference.rejected] + folder.skipped:
            console.print(f"[yellow]skipped[/] {terminal_safe(name)}: {terminal_safe(reason)}", highlight=False)
        losses = TextColumn("loss {task.fields[loss]} face_sim {task.fields[face_sim]}")
        # Into a store: written to a private temporary folder, put in the store, then erased (the
        # folder holds the reference embeddings: biometric data lives only in the store).
        with tempfile.TemporaryDirectory(prefix="pv-ray-tune-") if out is None else nullcontext(out) as folder_out:
            with progress_bar(losses, TimeRemainingColumn(), description="tuning") as progress:
                task = progress.add_task("tune", total=cfg.train.steps, loss="-", face_sim="-")
                result = personalizer.personalize(
                    identity,
                    reference,
                    Path(folder_out),
                    meta=meta,
                    on_step=lambda m: progress.update(
                        task, completed=m.step, loss=f"{m.loss:.3f}", face_sim=f"{m.face_sim:.3f}"
                    ),
                )
            where = out if adapter_store is None else adapter_store.put(identity, folder_out, overwrite=force).uri
        before, after = result.metrics_before, result.metrics_after
        console.print(
            f"face_sim on evaluation prompts: {before['face_sim']:.3f} -> {after['face_sim']:.3f}; "
            f"dynamic_degree {before['dynamic_degree']:.4f} -> {after['dynamic_degree']:.4f}"
        )
        console.print(f"adapter written to [bold]{terminal_safe(where)}[/] in {result.seconds:.1f}s", soft_wrap=True)


def _store_to_tune_into(store: str, identity: str, cfg, replace: bool):
    """The store `pv-ray tune --store` puts its adapter in, checked before any tuning: it must hold
    adapters of this config's backbone only, and not the identity already unless `replace`, nor
    have erased it."""
    from pv_ray.backbones import configured_backbone_record
    from pv_ray.storage.adapter_store import AdapterStore
    from pv_ray.storage.tombstones import refusal_reason

    adapter_store = AdapterStore(store)
    adapter_store.check_backbone(configured_backbone_record(cfg.model))
    erased_on = adapter_store.tombstones.erased_on(identity)
    if erased_on is not None:
        raise InputError(f"--store {store}: {refusal_reason(identity, erased_on)}")
    if adapter_store.exists(identity) and not replace:
        raise InputError(f"--store {store}: {identity} has an adapter there already; pass --force to replace it")
    return adapter_store


def _metric(entry: dict, which: str) -> str:
    value = (entry.get(which) or {}).get("face_sim")
    return "n/a" if value is None else f"{value:.3f}"  # None: no face found in any evaluation frame


@app.command()
def personalize(
    config: ConfigOpt = None,
    input: Annotated[
        str | None,
        typer.Option(
            "--input", help="Identity folders root: path or URI (file://, s3://, ...). Default: the demo set."
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", help="Adapter store root: path or URI.")] = "out/personalize",
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (one GPU each when the cluster has GPUs).")
    ] = 1,
    force: Annotated[bool, typer.Option(help="Retrain identities that already have a complete adapter.")] = False,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: sqlite under the output).", envvar=TRACKING_ENV)
    ] = None,
    contact_sheet: Annotated[
        bool | None,
        typer.Option(
            help="Write contact_sheet.png: reference, base and adapted clip per identity (default: demo only)."
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Personalize every identity under --input on Ray; adapters go to --output, runs to MLflow."""
    with user_errors():
        from pv_ray.config import load_config, packaged_config
        from pv_ray.storage.tracking import resolve_tracking_uri

        cfg = load_config(config or packaged_config(), set_ or [])
        if input is not None:
            from pv_ray.storage.identity_folders import check_input_root

            check_input_root(input)  # missing, empty or one identity's folder: refused before anything is written
        tracking_uri = resolve_tracking_uri(tracking_uri, output)  # a remote output without one: refused first
        quiet_libraries()
        from pv_ray.cluster.batch import run_batch

        demo = input is None
        if demo:
            from pv_ray.presets.demo import build_demo_identities, demo_input_for

            input = demo_input_for(output)
            ids = build_demo_identities(input)
            console.print(f"demo input: {len(ids)} identities written to [bold]{terminal_safe(input)}[/]")
        with batch_progress() as show:
            report = run_batch(
                cfg, input, output, workers=workers, force=force, tracking_uri=tracking_uri, on_progress=show
            )
            show(report.counts)
        _print_batch(report)
        if demo if contact_sheet is None else contact_sheet:
            _write_contact_sheet(cfg, report, input)
        if report.error:
            raise TuningFailed(f"the training run stopped early: {report.error}")
        counts = report.counts
        if not counts["done"] + counts["skipped"]:  # nothing tuned and nothing already there: not a success
            raise TuningFailed(
                f"no identity was tuned ({counts['failed']} failed, {counts['rejected']} rejected): "
                f"see the reasons above and in {report.report_uri}"
            )


@contextmanager
def batch_progress():
    """A live bar of the batch; yields the `on_progress(counts)` callback that moves it."""
    from rich.progress import TextColumn

    started = time.time()
    with progress_bar(TextColumn("{task.fields[counts]}"), description="identities") as progress:
        task = progress.add_task("batch", total=None, counts="analysing photos")

        def show(counts: dict[str, int]) -> None:
            finished = counts["done"] + counts["failed"] + counts["skipped"] + counts["rejected"]
            rate = counts["done"] / max(time.time() - started, 1e-9) * 3600
            progress.update(
                task,
                total=finished + counts["remaining"],
                completed=finished,
                counts=(
                    f"done {counts['done']} failed {counts['failed']} skipped {counts['skipped']} "
                    f"rejected {counts['rejected']} "
                    f"remaining {counts['remaining']} ({rate:.0f}/h)"
                ),
            )

        yield show


def _print_batch(report) -> None:
    from rich.table import Table

    table = Table("identity", "status", "face_sim before → after", "seconds / reason", title=f"batch {report.batch_id}")
    for identity_id, entry in report.identities.items():
        done = entry["status"] == "done"
        sims = f"{_metric(entry, 'metrics_before')} → {_metric(entry, 'metrics_after')}" if done else ""
        detail = str(entry.get("seconds", "")) if done else terminal_safe(entry.get("reason", ""))
        table.add_row(terminal_safe(identity_id), entry["status"], sims, detail)  # refused names come from the input
    console.print(table)
    c = report.counts
    console.print(
        f"{c['total']} identities: {c['done']} tuned, {c['skipped']} skipped (already done), "
        f"{c['failed']} failed, {c['rejected']} rejected"
    )
    console.print(
        f"adapters: [bold]{terminal_safe(report.output)}[/]  report: {terminal_safe(report.report_uri)}  "
        f"rejects: {terminal_safe(report.rejects_uri)}  MLflow: {terminal_safe(report.tracking_uri)}"
    )


def _write_contact_sheet(cfg, report, input_uri: str) -> None:
    import tempfile

    from pv_ray.evaluation.contact_sheet import write_contact_sheet
    from pv_ray.storage.adapter_store import AdapterStore
    from pv_ray.storage.personal_data import CONTACT_SHEET_NAME

    store = AdapterStore(report.output)
    identities = store.list_identities()
    if not identities:
        return
    # Into the store itself, remote or not: it shows people's photos (never the working directory).
    drawing = console.status(f"drawing the contact sheet of {len(identities)} identities")
    with drawing, tempfile.TemporaryDirectory(prefix="pv-ray-sheet-") as folder:
        path = write_contact_sheet(cfg, store, input_uri, identities, Path(folder) / CONTACT_SHEET_NAME)
        uri = store.root.write_bytes(CONTACT_SHEET_NAME, Path(path).read_bytes())
    console.print(
        f"contact sheet (reference, base clip, adapted clip per identity): [bold]{terminal_safe(uri)}[/]",
        highlight=False,
    )


@app.command()
def serve(
    store: StoreOpt,
    config: RecordedConfigOpt = None,
    host: Annotated[
        str,
        typer.Option(help="Address to bind; any but loopback (e.g. 0.0.0.0) needs PV_RAY_API_KEY set."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    max_adapters: Annotated[int, typer.Option(min=1, help="Identity adapters kept in memory per replica (LRU).")] = 4,
    min_replicas: Annotated[int, typer.Option(min=1, help="Generator replicas kept warm.")] = 1,
    max_replicas: Annotated[
        int, typer.Option(min=1, help="Autoscaling cap on generator replicas (one backbone each).")
    ] = 1,
    replica_cpus: Annotated[
        float | None, typer.Option(help="CPUs per generator replica (default: sized for the machine).")
    ] = None,
    replica_gpus: Annotated[
        float | None, typer.Option(help="GPUs per generator replica (default: 1 where GPUs exist).")
    ] = None,
    upscale_delay: Annotated[
        float, typer.Option(min=0, help="Seconds of load above target before a replica is added.")
    ] = 10,
    downscale_delay: Annotated[float, typer.Option(min=0, help="Seconds of idle before a replica is removed.")] = 300,
    target_ongoing: Annotated[
        float, typer.Option(min=0.1, help="Requests in flight per replica the autoscaler aims for.")
    ] = 2,
    allow_other_backbone: OtherBackboneOpt = False,
    set_: SetOpt = None,
    insecure_no_api_key: Annotated[
        bool,
        typer.Option(
            "--insecure-no-api-key", help="Serve a non-loopback --host without PV_RAY_API_KEY: anyone reaching it may."
        ),
    ] = False,
) -> None:
    """Serve videos over HTTP on Ray Serve: POST /v1/generate, GET /v1/identities, docs at /docs."""
    with user_errors():
        from serving.guard import API_KEY_ENV, api_keys, is_loopback

        # Closed by default: checked before anything starts.
        if not is_loopback(host) and not api_keys():
            if not insecure_no_api_key:
                raise InputError(
                    f"--host {host} is reachable beyond this machine and {API_KEY_ENV} is not set: export "
                    f"{API_KEY_ENV}=<a long random key> (clients send 'Authorization: Bearer <key>'), "
                    "or pass --insecure-no-api-key to serve it open"
                )
            console.print(
                f"[yellow]warning:[/] serving {terminal_safe(host)} without an API key (--insecure-no-api-key): "
                "anyone who reaches this port can make videos of every identity in the store",
                highlight=False,
            )
        from pv_ray.backbones import configured_backbone_record, model_paths
        from pv_ray.config import given_or_recorded_config
        from pv_ray.storage.adapter_store import AdapterStore
        from pv_ray.storage.uris import absolute_uri, is_remote

        store = absolute_uri(store)
        if not is_remote(store) and not Path(store).is_dir():
            raise InputError(f"--store {store}: folder not found")
        adapter_store = AdapterStore(store)
        cfg = given_or_recorded_config(config, set_, None if config else adapter_store.tuning_config())
        paths = model_paths(cfg.model)  # a missing model folder is one line here, not a failed replica
        if not allow_other_backbone:  # tuned on other weights: one line
            adapter_store.check_backbone(configured_backbone_record(cfg.model, paths))
        if min_replicas > max_replicas:
            raise InputError(f"--min-replicas ({min_replicas}) > --max-replicas ({max_replicas})")
        quiet_libraries()
        from pv_ray.cluster.service import run_service

        args = {
            "config": str(Path(config).resolve()) if config else None,  # None: the recorded one, read again there
            "store": store,
            "overrides": set_ or [],
            "max_adapters_per_replica": max_adapters,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "replica_cpus": replica_cpus,
            "replica_gpus": replica_gpus,
            "upscale_delay_s": upscale_delay,
            "downscale_delay_s": downscale_delay,
            "target_ongoing_requests": target_ongoing,
            "allow_other_backbone": allow_other_backbone,
        }

        def ready(url: str, ray_address: str) -> None:
            status.stop()
            console.print(
                f"serving on [bold]{url}[/] (web page: {url}/ , API docs: {url}/docs); Ray at {ray_address}; "
                "Ctrl-C to stop",
                highlight=False,
                soft_wrap=True,  # one line, however narrow the terminal: scripts read the URL from it
            )

        status = console.status("starting Ray Serve and loading the backbone")
        status.start()
        try:
            run_service(args, host=host, port=port, on_ready=ready, require_api_key=bool(api_keys()))
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            status.stop()


@app.command()
def evaluate(
    store: StoreOpt,
    identities: Annotated[
        str | None, typer.Option(help="Comma-separated identity ids (default: every complete adapter).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: sqlite under the store).", envvar=TRACKING_ENV)
    ] = None,
    config: RecordedConfigOpt = None,
    allow_other_backbone: OtherBackboneOpt = False,
    set_: SetOpt = None,
) -> None:
    """Evaluate the store's adapters against the untuned backbone on held-out prompts; MLflow + evaluation.json."""
    with user_errors():
        from pv_ray.config import given_or_recorded_config
        from pv_ray.evaluation.store_evaluation import evaluate_store, open_evaluation, parse_identities

        recorded = None if config else _existing_store(store).tuning_config()
        cfg = given_or_recorded_config(config, set_, recorded)
        # Input errors before any model loads.
        _, ids = open_evaluation(cfg, store, parse_identities(identities), allow_other_backbone=allow_other_backbone)
        quiet_libraries()
        from rich.progress import TextColumn

        with progress_bar(TextColumn("{task.fields[last]}"), description="evaluating") as progress:
            task = progress.add_task("evaluate", total=None, last="loading the backbone")
            report = evaluate_store(
                cfg,
                store,
                identities=ids,
                tracking_uri=tracking_uri,
                allow_other_backbone=allow_other_backbone,
                on_start=lambda total: progress.update(task, total=total),
                on_identity=lambda r: progress.update(task, advance=1, last=f"{r.identity_id}: {r.status}"),
            )
        _print_evaluation(report)


def _print_evaluation(report) -> None:
    from rich.table import Table

    def fmt(value: float) -> str:
        return "n/a" if value != value else f"{value:.4f}"  # NaN: no face found in any frame

    summary = Table(
        "metric",
        "base mean ± std",
        "adapted mean ± std",
        "delta mean ± std",
        "n",
        title=f"evaluation {report.evaluation_id}",
    )
    for metric, stats in report.summary.items():
        cells = [f"{fmt(stats[v]['mean'])} ± {fmt(stats[v]['std'])}" for v in ("base", "adapted", "delta")]
        summary.add_row(metric, *cells, str(stats["delta"]["n"]))
    console.print(summary)
    metrics = list(report.summary)
    per_identity = Table(
        "identity", "status", *(f"Δ {m}" for m in metrics), "reason", title="per-identity deltas (adapted − base)"
    )
    for identity_id, result in report.identities.items():
        deltas = [fmt(result.delta[m]) if result.status == "done" else "" for m in metrics]
        per_identity.add_row(identity_id, result.status, *deltas, result.reason or "")
    console.print(per_identity)
    c = report.counts
    console.print(
        f"{c['done']} evaluated, {c['skipped']} skipped, {c['failed']} failed; "
        f"CLIP text alignment: {report.clip_text_alignment}; independent judge: {report.independent_judge}"
    )
    console.print(f"report: {report.report_uri}  MLflow: {report.tracking_uri} (run {report.run_id})", highlight=False)


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: the sqlite store under --store, where it exists).", envvar=TRACKING_ENV
    ),
]


def _existing_store(store: str):
    """The adapter store at `store`, which must exist (a typo is an error, not an empty store)."""
    from pv_ray.storage.adapter_store import AdapterStore

    adapter_store = AdapterStore(store)
    if not adapter_store.root.exists():
        raise InputError(f"--store {store}: no such store ({adapter_store.root_uri} does not exist)")
    return adapter_store


def _existing_tracker(tracking_uri: str | None, store):
    """The tracking stores that hold runs of `store`'s identities, opened as they are (nothing is
    created): --tracking-uri, those the store recorded (tracking.json) and the sqlite store inside
    it. One that cannot be reached is returned as such: the caller reports it, never skips it."""
    from pv_ray.storage.personal_data import TrackingStore, open_tracking_stores, tracking_uris_of
    from pv_ray.storage.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # An unreachable server is reported after seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    uris = tracking_uris_of(store, resolve_tracking_uri(tracking_uri, store.root_uri) if tracking_uri else None)
    if not uris and not store.root.is_local:
        # A remote store's runs are always somewhere else (it has no default tracking store): not
        # knowing where is a place left uncleaned, not a clean exit.
        return [
            TrackingStore(
                "(not recorded)", unreachable=f"{store.root_uri} records no tracking store: give --tracking-uri"
            )
        ]
    if not uris:
        console.print(
            f"no MLflow store is recorded in {terminal_safe(store.root_uri)} (give --tracking-uri if its runs are "
            "elsewhere)",
            highlight=False,
        )
    return open_tracking_stores(uris)


@app.command()
def delete(
    identities: Annotated[list[str], typer.Argument(help="Identity ids to erase.", show_default=False)],
    store: StoreOpt,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Erase identities everywhere pv-ray put them (README: Security and personal data): adapter and face
    descriptors, staging and worker folders, report entries, serving videos, the contact sheet,
    MLflow runs and artifacts; a tombstone (a keyed hash of the id) makes `personalize` refuse them
    until `pv-ray reinstate`. Exits 1 if anything is left or a tracking store cannot be reached."""
    with user_errors():
        from pv_ray.storage.identity import validate_identity_id
        from pv_ray.storage.personal_data import erase_identity

        for identity_id in identities:
            validate_identity_id(identity_id)  # every id checked before anything is removed
        adapter_store = _existing_store(store)
        tracking = _existing_tracker(tracking_uri, adapter_store)
        left = 0
        for identity_id in identities:
            erasure = erase_identity(adapter_store, identity_id, tracking)
            for what in erasure.removed:
                console.print(f"[green]removed[/] {terminal_safe(what)}", highlight=False, soft_wrap=True)
            for what in erasure.left:
                console.print(f"[bold red]not removed[/] {terminal_safe(what)}", highlight=False, soft_wrap=True)
            if not erasure.removed and erasure.complete:
                console.print(
                    f"nothing of {identity_id} was found in {terminal_safe(adapter_store.root_uri)}", highlight=False
                )
            if erasure.erased_on is not None:
                console.print(
                    f"tombstone left: personalize refuses {identity_id} until `pv-ray reinstate {identity_id}`",
                    highlight=False,
                )
            left += len(erasure.left)
        if left:
            console.print(f"[bold red]{left} item(s) could not be removed[/]; run the command again once fixed")
            raise typer.Exit(1)


@app.command()
def reinstate(
    identities: Annotated[list[str], typer.Argument(help="Erased identity ids to allow again.", show_default=False)],
    store: StoreOpt,
) -> None:
    """Allow erased identities to be personalized again: removes the tombstones `delete` left."""
    with user_errors():
        from pv_ray.storage.identity import validate_identity_id
        from pv_ray.storage.personal_data import reinstate_identity

        for identity_id in identities:
            validate_identity_id(identity_id)
        adapter_store = _existing_store(store)
        for identity_id in identities:
            if reinstate_identity(adapter_store, identity_id):
                console.print(f"reinstated {identity_id}: the next personalize tunes it again", highlight=False)
            else:
                console.print(
                    f"{identity_id} was not erased in {terminal_safe(adapter_store.root_uri)}", highlight=False
                )


@app.command("export-identity")
def export_identity(
    identity: Annotated[str, typer.Argument(help="Identity id.", show_default=False)],
    store: StoreOpt,
    out: Annotated[Path, typer.Option(help="The zip file to write.")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """Everything pv-ray holds of one identity, as a zip (a subject access request)."""
    with user_errors():
        from pv_ray.storage.adapter_store import AdapterNotFound
        from pv_ray.storage.identity import validate_identity_id
        from pv_ray.storage.personal_data import export_identity as export

        validate_identity_id(identity)
        adapter_store = _existing_store(store)
        try:
            data = export(adapter_store, identity, _existing_tracker(tracking_uri, adapter_store))
        except AdapterNotFound as e:
            raise InputError(str(e)) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        console.print(f"{identity}: [bold]{terminal_safe(out)}[/] ({len(data)} bytes)", highlight=False)


@app.command()
def export(
    store: StoreOpt,
    identity: Annotated[str, typer.Option(help="Identity id.")],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write.")],
    format: Annotated[str, typer.Option(help="kohya: the LoRA key format ComfyUI and A1111 load.")] = "kohya",
) -> None:
    """Write one identity adapter in another tool's format (README: the isolation window there)."""
    with user_errors():
        from pv_ray.config import AdapterConfig
        from pv_ray.model.animatediff.kohya_export import kohya_lora_bytes
        from pv_ray.storage.adapter_folder import WEIGHTS_NAME, recorded_active_fraction
        from pv_ray.storage.adapter_store import AdapterNotFound, AdapterStoreError
        from pv_ray.storage.identity import validate_identity_id

        if format != "kohya":
            raise InputError(f"--format {format!r}: only kohya is supported")
        if out.suffix != ".safetensors":
            raise InputError(f"--out {out}: must end in .safetensors")
        validate_identity_id(identity)
        adapter_store = _existing_store(store)
        try:
            record = adapter_store.get(identity)
            fraction = recorded_active_fraction(record.metadata, AdapterConfig().active_fraction)
            weights = adapter_store.read_weights_bytes(identity)
        except AdapterNotFound as e:
            raise InputError(str(e)) from None
        except (AdapterStoreError, ValueError) as e:  # corrupt, or adapter.json out of range: one line
            raise InputError(f"{identity}: {e}") from None
        data = kohya_lora_bytes(weights, fraction, f"{identity}/{WEIGHTS_NAME}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        console.print(
            f"{identity}: [bold]{terminal_safe(out)}[/] (kohya keys); tuned for the last {fraction:.0%} of denoising: "
            "schedule the LoRA strength as README's 'ComfyUI and A1111' says",
            highlight=False,
        )


def main() -> None:  # pragma: no cover - console-script entry
    sys.exit(app())
