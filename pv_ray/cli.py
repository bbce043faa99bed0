"""The `pv-ray` command line. Thin: parse, validate, call the library, show progress.

User errors (bad config, missing model folder, bad request, unusable photos) print one line on
stderr and exit with status 2; set PV_RAY_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Personalize a text-to-video model to many identities, on Ray.")
models_app = typer.Typer(no_args_is_help=True, help="Model folders (the tiny preset).")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (configs/tiny.yaml, ...).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=value (repeatable).")]


@contextmanager
def user_errors():
    """Turn the library's input errors into one clear line and a non-zero exit."""
    try:
        yield
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("PV_RAY_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def quiet_libraries() -> None:
    """Keep the terminal for pv-ray's own progress: diffusers/transformers are chatty."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("ray", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """Ray Data configures its own logger when first imported (DEBUG, with a console handler
    that prints every operator's progress), so it is turned down after that import."""
    import ray.data  # noqa: F401

    logging.getLogger("ray.data").setLevel(logging.WARNING)


def step_progress(description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False)


@models_app.command("init-tiny")
def init_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the tiny pipeline into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights (same seed, identical files).")] = 0,
) -> None:
    """Write the tiny preset: an AnimateDiff pipeline folder plus motion_adapter/ and faces/."""
    with user_errors():
        quiet_libraries()
        from pv_ray.presets.tiny import build_tiny_models

        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} exists and is not empty")
        build_tiny_models(out, seed=seed)
        console.print(f"tiny models written to [bold]{out}[/]")


@app.command()
def generate(
    config: ConfigOpt,
    prompt: Annotated[str, typer.Option(help="What the video shows.")],
    out: Annotated[Path, typer.Option(help="Output file: .mp4 or .gif.")],
    frames: Annotated[Optional[int], typer.Option(help="Number of frames (default: video.num_frames).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: video.num_inference_steps).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: same seed, same frames.")] = 0,
    adapter: Annotated[Optional[Path], typer.Option(help="Identity adapter folder (pytorch_lora_weights.safetensors).")] = None,
    set_: SetOpt = None,
) -> None:
    """Generate one video, with the base model or an identity adapter."""
    with user_errors():
        from pv_ray.config import load_config
        from pv_ray.model.sampling import SampleSpec, check_request
        from pv_ray.storage.video import resolve_format

        cfg = load_config(config, set_ or [])
        fmt = resolve_format(out)  # refuse an unsupported extension before any model loads
        spec = SampleSpec(
            num_frames=frames if frames is not None else cfg.video.num_frames,
            height=cfg.video.height,
            width=cfg.video.width,
            num_inference_steps=steps if steps is not None else cfg.video.num_inference_steps,
            guidance_scale=cfg.video.guidance_scale,
        )
        check_request(cfg.limits, spec, prompt)
        quiet_libraries()

        from pv_ray.model.adapter import IdentityAdapter, read_adapter_file
        from pv_ray.model.backbone import Backbone
        from pv_ray.model.sampling import generate as generate_frames
        from pv_ray.storage.video import frames_to_uint8, write_video

        weights = read_adapter_file(adapter) if adapter is not None else None
        with console.status("loading the backbone"):
            backbone = Backbone.load(cfg.model)
        check_request(cfg.limits, spec, prompt, backbone.unet.config.motion_max_seq_length)
        if weights is not None:
            state_dict, rank, alpha = weights
            adapter_cfg = cfg.adapter.model_copy(
                update={
                    "rank": max(rank, cfg.adapter.rank),
                    "cross_attention": cfg.adapter.cross_attention or any(".attn2." in k for k in state_dict),
                }
            )
            IdentityAdapter(backbone.unet, adapter_cfg, backbone.num_train_timesteps).load_state_dict(state_dict, rank=rank, alpha=alpha)
        with step_progress("denoising") as progress:
            task = progress.add_task("denoise", total=spec.num_inference_steps)
            video = generate_frames(
                backbone,
                prompt,
                spec,
                seed=seed,
                negative_prompt=cfg.video.negative_prompt,
                on_step=lambda done, total: progress.update(task, completed=done),
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(frames_to_uint8(video), out, fps=cfg.video.fps, format=fmt)
        console.print(f"wrote {spec.num_frames} frames ({spec.width}x{spec.height}) to [bold]{out}[/]")


@app.command()
def tune(
    config: ConfigOpt,
    images: Annotated[str, typer.Option(help="Folder (path or URI) with 1..N photos of the person, optional meta.json.")],
    identity: Annotated[str, typer.Option(help="Identity id: letters, digits, . _ - (max 128).")],
    out: Annotated[Path, typer.Option(help="Adapter folder to write.")],
    set_: SetOpt = None,
) -> None:
    """Tune one identity's spatial adapter from its photos (no Ray needed)."""
    with user_errors():
        from pv_ray.config import load_config
        from pv_ray.storage.identity import read_identity_folder, validate_identity_id

        cfg = load_config(config, set_ or [])
        validate_identity_id(identity)
        folder = read_identity_folder(identity, images, max_photo_bytes=cfg.faces.max_photo_bytes)
        quiet_libraries()

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from pv_ray.method.tuner import IdentityMeta, Personalizer

        meta = IdentityMeta.parse(folder.meta, f"{images}/meta.json") if folder.meta is not None else None
        with console.status("loading the backbone and the face models"):
            personalizer = Personalizer(cfg)
        reference = personalizer.analyzer.reference(folder.photos)  # IdentityRejected lists each photo's reason
        for photo in reference.rejected:
            console.print(f"[yellow]skipped[/] {photo.name}: {photo.reason}", highlight=False)
        for name, reason in folder.skipped:
            console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
        columns = (TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]} face_sim {task.fields[face_sim]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("tune", total=cfg.train.steps, loss="-", face_sim="-")
            result = personalizer.personalize(
                identity,
                reference,
                out,
                meta=meta,
                on_step=lambda m: progress.update(task, completed=m.step, loss=f"{m.loss:.3f}", face_sim=f"{m.face_sim:.3f}"),
            )
        before, after = result.metrics_before, result.metrics_after
        console.print(f"face_sim on evaluation prompts: {before['face_sim']:.3f} -> {after['face_sim']:.3f}; dynamic_degree {before['dynamic_degree']:.4f} -> {after['dynamic_degree']:.4f}")
        console.print(f"adapter written to [bold]{out}[/] in {result.seconds:.1f}s")


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@app.command()
def personalize(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: configs/tiny.yaml).")] = None,
    input: Annotated[Optional[str], typer.Option("--input", help="Identity folders root: path or URI (file://, s3://, ...). Default: the built-in demo set.")] = None,
    output: Annotated[str, typer.Option("--output", help="Adapter store root: path or URI.")] = "out/personalize",
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (one GPU each when the cluster has GPUs).")] = 1,
    force: Annotated[bool, typer.Option(help="Retrain identities that already have a complete adapter.")] = False,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite under the output).")] = None,
    set_: SetOpt = None,
) -> None:
    """Personalize every identity under --input on Ray; adapters go to --output, runs to MLflow."""
    with user_errors():
        from pv_ray.config import load_config

        cfg = load_config(config or DEMO_CONFIG, set_ or [])
        quiet_libraries()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from pv_ray.cluster.batch import run_batch

        quiet_ray_data()
        if input is None:
            from pv_ray.presets.demo import build_demo_identities

            input = str(Path(output.removeprefix("file://")).parent / "demo-identities") if "://" not in output or output.startswith("file://") else ".pv-ray/demo-identities"
            ids = build_demo_identities(input)
            console.print(f"demo input: {len(ids)} identities written to [bold]{input}[/]")
        started = time.time()
        columns = (TextColumn("identities"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("batch", total=None, counts="analysing photos")

            def show(counts: dict[str, int]) -> None:
                finished = counts["done"] + counts["failed"] + counts["skipped"]
                rate = counts["done"] / max(time.time() - started, 1e-9) * 3600
                progress.update(
                    task,
                    total=finished + counts["remaining"],
                    completed=finished,
                    counts=f"done {counts['done']} failed {counts['failed']} skipped {counts['skipped']} remaining {counts['remaining']} ({rate:.0f}/h)",
                )

            report = run_batch(cfg, input, output, workers=workers, force=force, tracking_uri=tracking_uri, on_progress=show)
            show({k: report.counts.get(k, 0) for k in ("done", "failed", "skipped", "remaining")})
        table = Table("identity", "status", "face_sim before → after", "seconds / reason", title=f"batch {report.batch_id}")
        for identity_id, entry in report.identities.items():
            before, after = (entry.get("metrics_before") or {}), (entry.get("metrics_after") or {})
            sims = f"{before.get('face_sim') or float('nan'):.3f} → {after.get('face_sim') or float('nan'):.3f}" if entry["status"] == "done" else ""
            table.add_row(identity_id, entry["status"], sims, str(entry.get("seconds", "")) if entry["status"] == "done" else entry.get("reason", ""))
        console.print(table)
        c = report.counts
        console.print(f"{c['total']} identities: {c['done']} tuned, {c['skipped']} skipped (already done), {c['failed']} failed, {c['rejected']} rejected")
        console.print(f"adapters: [bold]{report.output}[/]  report: {report.report_uri}  rejects: {report.rejects_uri}  MLflow: {report.tracking_uri}")
        if report.error:
            raise ValueError(f"the training run stopped early: {report.error}")


@app.command()
def serve(
    config: ConfigOpt,
    store: Annotated[str, typer.Option(help="Adapter store root: path or URI (the --output of personalize).")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the service beyond this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    max_adapters: Annotated[int, typer.Option(min=1, help="Identity adapters kept in memory per replica (LRU).")] = 4,
    max_replicas: Annotated[int, typer.Option(min=1, help="Autoscaling cap on generator replicas (one backbone each).")] = 1,
    set_: SetOpt = None,
) -> None:
    """Serve videos over HTTP on Ray Serve: POST /v1/generate, GET /v1/identities, docs at /docs."""
    with user_errors():
        from pv_ray.model.backbone import resolve_model_paths
        from pv_ray.config import load_config

        cfg = load_config(config, set_ or [])
        resolve_model_paths(cfg.model)  # a missing model folder is one line here, not a failed replica
        if "://" not in store and not Path(store).expanduser().is_dir():
            raise ValueError(f"--store {store}: folder not found")
        quiet_libraries()
        from ray import serve as ray_serve

        from serving.app import build_app

        autoscaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2, "upscale_delay_s": 10, "downscale_delay_s": 300}
        application = build_app(
            str(config), store, overrides=set_ or [], max_adapters_per_replica=max_adapters, generator_options={"autoscaling_config": autoscaling}
        )
        try:
            with console.status("starting Ray Serve and loading the backbone"):
                ray_serve.start(http_options={"host": host, "port": port})
                ray_serve.run(application, name="pv-ray", route_prefix="/")
            url = f"http://{host}:{port}"
            console.print(f"serving on [bold]{url}[/] (API docs: {url}/docs); Ctrl-C to stop", highlight=False)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            ray_serve.shutdown()


@app.command()
def evaluate(
    config: ConfigOpt,
    store: Annotated[str, typer.Option(help="Adapter store root: path or URI (the --output of personalize).")],
    identities: Annotated[Optional[str], typer.Option(help="Comma-separated identity ids (default: every complete adapter).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite under the store).")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate the store's adapters against the untuned backbone on held-out prompts; MLflow + evaluation.json."""
    with user_errors():
        from pv_ray.config import load_config
        from pv_ray.evaluation.store_evaluation import evaluate_store, open_evaluation, parse_identities

        cfg = load_config(config, set_ or [])
        _, ids = open_evaluation(cfg, store, parse_identities(identities))  # input errors before any model loads
        quiet_libraries()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        def fmt(value: float) -> str:
            return "n/a" if value != value else f"{value:.4f}"  # NaN: no face found in any frame

        columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("evaluate", total=None, last="loading the backbone")
            report = evaluate_store(
                cfg,
                store,
                identities=ids,
                tracking_uri=tracking_uri,
                on_start=lambda total: progress.update(task, total=total),
                on_identity=lambda r: progress.update(task, advance=1, last=f"{r.identity_id}: {r.status}"),
            )
        summary = Table("metric", "base mean ± std", "adapted mean ± std", "delta mean ± std", "n", title=f"evaluation {report.evaluation_id}")
        for metric, stats in report.summary.items():
            cells = [f"{fmt(stats[v]['mean'])} ± {fmt(stats[v]['std'])}" for v in ("base", "adapted", "delta")]
            summary.add_row(metric, *cells, str(stats["delta"]["n"]))
        console.print(summary)
        metrics = list(report.summary)
        per_identity = Table("identity", "status", *(f"Δ {m}" for m in metrics), "reason", title="per-identity deltas (adapted − base)")
        for identity_id, result in report.identities.items():
            deltas = [fmt(result.delta[m]) if result.status == "done" else "" for m in metrics]
            per_identity.add_row(identity_id, result.status, *deltas, result.reason or "")
        console.print(per_identity)
        c = report.counts
        console.print(f"{c['done']} evaluated, {c['skipped']} skipped, {c['failed']} failed; CLIP text alignment: {report.clip_text_alignment}")
        console.print(f"report: {report.report_uri}  MLflow: {report.tracking_uri} (run {report.run_id})", highlight=False)


def main() -> None:  # pragma: no cover - console-script entry
    sys.exit(app())
