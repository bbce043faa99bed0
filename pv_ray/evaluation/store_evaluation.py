"""Evaluate a store's identity adapters against the untuned backbone (`pv-ray evaluate`).

The video pipeline (backbone and one injected adapter) is loaded once; each identity's weights are
copied into that adapter in turn. Per identity, the same held-out prompts and seeds are generated with the
adapter off (base) and on (adapted), scored against the reference embedding recorded in the
identity's adapter.json (the store keeps no photos), and logged to MLflow as a nested run under
one evaluation run. The report (`evaluation.json` in the store) holds every identity's numbers
and their mean / std over identities.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pv_ray.backbones import configured_backbone_record, load_backbone
from pv_ray.config import PVConfig
from pv_ray.errors import InputError
from pv_ray.evaluation.clip_alignment import ClipTextAlignment, check_clip_folder
from pv_ray.evaluation.clips import INDEPENDENT, METRICS, TEXT_ALIGNMENT, ClipCache, evaluate_prompts, evaluation_spec
from pv_ray.evaluation.judge import DESCRIPTOR_DIM, NOT_INSTALLED, IndependentJudge, judge_available
from pv_ray.evaluation.metrics import json_safe, summarize
from pv_ray.faces.arcface import EMBEDDING_DIM
from pv_ray.model.pipeline import VideoPipeline
from pv_ray.prompts import check_disjoint, evaluation_prompts, training_prompts, validate_class_word
from pv_ray.storage.adapter_folder import (
    AdapterFileError,
    LoraWeights,
    backbone_mismatch,
    recorded_active_fraction,
    recorded_adapter_config,
)
from pv_ray.storage.adapter_store import AdapterStore, AdapterStoreError
from pv_ray.storage.identity import validate_identity_id
from pv_ray.storage.personal_data import record_tracking_uri, write_store_document
from pv_ray.storage.tracking import Tracker, default_tracking_uri

REPORT_NAME = "evaluation.json"
VARIANTS = ("base", "adapted", "delta")
TAG_TASK = "pv_ray.task"
CLIP_NOT_CONFIGURED = "not configured (set eval.clip_model to a local CLIP folder)"


class EvaluationSkip(ValueError):
    """An identity that cannot be evaluated; the reason goes to the report, the others go on."""


@dataclass
class IdentityEvaluation:
    identity_id: str
    status: str  # "done" | "skipped" (nothing to evaluate against) | "failed" (adapter unusable)
    reason: str | None = None
    class_word: str | None = None
    eval_prompts: list[str] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)
    adapted: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


@dataclass
class EvaluationReport:
    evaluation_id: str
    store: str
    tracking_uri: str
    run_id: str
    identities: dict[str, IdentityEvaluation]
    summary: dict[str, dict[str, dict[str, float | int]]]
    clip_text_alignment: str
    independent_judge: str = ""
    report_uri: str = ""

    @property
    def counts(self) -> dict[str, int]:
        statuses = [e.status for e in self.identities.values()]
        return {s: statuses.count(s) for s in ("done", "skipped", "failed")}

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict: NaN (no face found) becomes null."""
        return json_safe(
            {
                "evaluation_id": self.evaluation_id,
                "store": self.store,
                "tracking_uri": self.tracking_uri,
                "run_id": self.run_id,
                "counts": self.counts,
                "clip_text_alignment": self.clip_text_alignment,
                "independent_judge": self.independent_judge,
                "summary": self.summary,
                "identities": {i: asdict(e) for i, e in self.identities.items()},
            }
        )


def select_identities(store: AdapterStore, requested: Sequence[str] | None) -> list[str]:
    """The store's complete adapters, or the `requested` ones; unknown ids are one error."""
    available = store.list_identities()
    if not requested:
        if not available:
            raise InputError(f"store {store.root_uri} has no complete adapter to evaluate")
        return available
    for identity_id in requested:
        validate_identity_id(identity_id)
    known = set(available)
    unknown = [i for i in requested if i not in known]
    if unknown:
        raise InputError(
            f"--identities: no complete adapter for {', '.join(unknown)} in {store.root_uri} "
            f"({len(available)} identities there)"
        )
    return list(dict.fromkeys(requested))


def open_evaluation(
    cfg: PVConfig,
    store_uri: str,
    identities: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_other_backbone: bool = False,
) -> tuple[AdapterStore, list[str]]:
    """The store and the identities to evaluate; every input error is raised here, before any model
    loads. Adapters tuned on another backbone are refused unless `allow_other_backbone`."""
    if cfg.eval.clip_model is not None:
        check_clip_folder(cfg.eval.clip_model)
    store = AdapterStore(store_uri, storage_options)
    selected = select_identities(store, identities)
    if selected and not allow_other_backbone:
        store.check_backbone(configured_backbone_record(cfg.model), selected[0])  # tuned on another backbone: one line
    return store, selected


def parse_identities(text: str | None) -> list[str] | None:
    """`a,b,c` → ["a", "b", "c"] (None or blank: all identities)."""
    if text is None or not text.strip():
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def summarize_identities(results: Sequence[IdentityEvaluation]) -> dict[str, dict[str, dict[str, float | int]]]:
    """{metric: {variant: {"mean", "std", "n"}}} over the evaluated identities (NaN ignored)."""
    done = [r for r in results if r.status == "done"]
    optional = [m for m in (TEXT_ALIGNMENT, INDEPENDENT) if any(m in r.base for r in done)]
    metrics = (*METRICS, *optional)
    return {m: {v: summarize([getattr(r, v)[m] for r in done]) for v in VARIANTS} for m in metrics}


def reference_embedding_of(metadata: dict[str, Any]) -> np.ndarray:
    """The identity's recorded reference embedding (adapter.json); EvaluationSkip if unusable."""
    raw = metadata.get("reference_embedding")
    if raw is None:
        raise EvaluationSkip(
            "adapter.json has no reference_embedding (adapter tuned before it was recorded); retune to evaluate it"
        )
    if not isinstance(raw, list) or len(raw) != EMBEDDING_DIM or not all(isinstance(x, (int, float)) for x in raw):
        raise EvaluationSkip(f"adapter.json reference_embedding is not a list of {EMBEDDING_DIM} numbers")
    embedding = np.asarray(raw, np.float32)
    if not np.all(np.isfinite(embedding)) or not np.any(embedding):
        raise EvaluationSkip("adapter.json reference_embedding is zero or not finite")
    return embedding


def independent_reference_of(metadata: dict[str, Any]) -> np.ndarray | None:
    """The judge's descriptor recorded in adapter.json (None: tuned without the judge installed)."""
    raw = metadata.get("independent_reference")
    if not isinstance(raw, list) or len(raw) != DESCRIPTOR_DIM or not all(isinstance(x, (int, float)) for x in raw):
        return None
    return np.asarray(raw, np.float32)


def recorded_training_prompts(metadata: dict[str, Any], class_word: str) -> list[str]:
    """The training prompts the adapter was tuned on, re-derived from its recorded config.

    Prompts added from the identity's meta.json are not recorded in adapter.json, so they cannot
    be checked here.
    """
    config = metadata.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    train = train if isinstance(train, dict) else {}
    try:
        return training_prompts(class_word, file=train.get("prompts_file"), seed=int(train.get("seed", 0)))
    except (TypeError, ValueError, OSError) as e:
        raise EvaluationSkip(f"cannot re-derive the training prompts to check disjointness: {e}") from None


class StoreEvaluator:
    """The backbone, face analysis and one injected adapter, loaded once for many identities."""

    def __init__(self, cfg: PVConfig, adapter_cfgs: Sequence[dict[str, Any]] = ()):
        from pv_ray.faces.analysis import FaceAnalyzer

        self.cfg = cfg
        self.pipeline = VideoPipeline.for_adapters(load_backbone(cfg.model), cfg.adapter, adapter_cfgs)
        backbone = self.pipeline.backbone
        self.analyzer = FaceAnalyzer.from_config(backbone.faces_folder, cfg.faces)
        self.text_alignment = (
            ClipTextAlignment(cfg.eval.clip_model, backbone.device) if cfg.eval.clip_model is not None else None
        )
        self.judge = IndependentJudge() if judge_available() else None
        self.spec = evaluation_spec(cfg)
        self.base_clips: ClipCache = {}  # the base model's clips are the same for every identity

    def evaluate(self, identity_id: str, metadata: dict[str, Any], weights_dir: str) -> IdentityEvaluation:
        """Base and adapted metrics of one identity whose adapter folder is `weights_dir`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        embedding = reference_embedding_of(metadata)
        independent = independent_reference_of(metadata)
        class_word = metadata.get("class_word")
        try:
            validate_class_word(class_word)
        except (TypeError, ValueError) as e:
            raise EvaluationSkip(f"adapter.json class_word {class_word!r}: {e}") from None
        prompts = evaluation_prompts(class_word, file=cfg.eval.prompts_file, count=cfg.eval.num_prompts)
        try:
            check_disjoint(recorded_training_prompts(metadata, class_word), prompts)
        except ValueError as e:
            raise EvaluationSkip(str(e)) from None
        # The identity's own isolation window, as it was tuned (the config's when not recorded).
        try:
            fraction = recorded_active_fraction(metadata, cfg.adapter.active_fraction)
        except ValueError as e:
            raise EvaluationSkip(str(e)) from None
        self.pipeline.use_identity(LoraWeights.read(weights_dir), fraction)

        def run(cache: ClipCache | None = None) -> dict[str, float]:
            return evaluate_prompts(
                self.pipeline,
                self.analyzer,
                embedding,
                prompts,
                self.spec,
                seed=cfg.eval.seed,
                negative_prompt=cfg.video.negative_prompt,
                text_alignment=self.text_alignment,
                judge=self.judge,
                judge_reference=independent,
                cache=cache,
            )

        with self.pipeline.base_model():
            base = run(self.base_clips)
        adapted = run()
        delta = {m: adapted[m] - base[m] for m in base}
        return IdentityEvaluation(
            identity_id,
            "done",
            class_word=class_word,
            eval_prompts=prompts,
            base=base,
            adapted=adapted,
            delta=delta,
            seconds=round(time.perf_counter() - t0, 3),
        )


def _finite_metrics(result: IdentityEvaluation) -> dict[str, float]:
    """`<metric>_<variant>` for MLflow; NaN (no face in any frame) is left out, not logged."""
    return {
        f"{m}_{v}": getattr(result, v)[m] for m in result.base for v in VARIANTS if math.isfinite(getattr(result, v)[m])
    }


def evaluate_store(
    cfg: PVConfig,
    store_uri: str,
    *,
    identities: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_other_backbone: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_identity: Callable[[IdentityEvaluation], None] | None = None,
) -> EvaluationReport:
    """Evaluate every (or each listed) adapter in the store; writes `evaluation.json` there."""
    store, ids = open_evaluation(cfg, store_uri, identities, storage_options, allow_other_backbone)
    records, unreadable = _read_records(store, ids)
    tracking_uri = tracking_uri or default_tracking_uri(store.root_uri)
    tracker = Tracker(tracking_uri)
    record_tracking_uri(store, tracking_uri)  # where `pv-ray delete` finds these runs
    evaluation_id = "eval-" + time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if on_start is not None:
        on_start(len(ids))
    evaluator = StoreEvaluator(cfg, [recorded_adapter_config(m) for m in records.values()])
    parent = tracker.start_batch(
        evaluation_id, {"store": store.root_uri, "identities": len(ids), "eval": cfg.eval.model_dump(mode="json")}
    )
    tracker.set_tags(parent, {TAG_TASK: "evaluate"})
    results: dict[str, IdentityEvaluation] = {}
    status = "FAILED"
    try:
        for identity_id in ids:
            result = unreadable.get(identity_id) or _evaluate_one(
                evaluator, store, identity_id, records[identity_id], allow_other_backbone
            )
            if result.status == "done":
                result.run_id = _log_identity(tracker, parent, evaluation_id, result)
            results[identity_id] = result
            if on_identity is not None:
                on_identity(result)
        status = "FINISHED"
    finally:
        summary = summarize_identities(list(results.values()))
        tracker.finish_batch(parent, _summary_metrics(summary, results.values()), status=status)
    clip = CLIP_NOT_CONFIGURED if cfg.eval.clip_model is None else f"CLIP model {cfg.eval.clip_model}"
    judge = (
        "dlib ResNet (face_dist_independent: lower is closer, < 0.6 same person)" if evaluator.judge else NOT_INSTALLED
    )
    report = EvaluationReport(evaluation_id, store.root_uri, tracking_uri, parent, results, summary, clip, judge)
    report.report_uri = write_store_document(store, REPORT_NAME, report.to_json())  # under the store's lock
    return report


def _read_records(
    store: AdapterStore, ids: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, IdentityEvaluation]]:
    """Each identity's adapter.json, and a failed result for those whose record is unreadable."""
    records: dict[str, dict[str, Any]] = {}
    unreadable: dict[str, IdentityEvaluation] = {}
    for identity_id in ids:
        try:
            records[identity_id] = store.get(identity_id).metadata
        except AdapterStoreError as e:
            unreadable[identity_id] = IdentityEvaluation(identity_id, "failed", reason=str(e))
    return records, unreadable


def _evaluate_one(
    evaluator: StoreEvaluator,
    store: AdapterStore,
    identity_id: str,
    metadata: dict[str, Any],
    allow_other_backbone: bool = False,
) -> IdentityEvaluation:
    """One identity's evaluation; a skip or an unusable adapter becomes its result."""
    other_backbone = None if allow_other_backbone else backbone_mismatch(metadata, evaluator.pipeline.backbone.record)
    if other_backbone:
        return IdentityEvaluation(identity_id, "failed", reason=other_backbone)
    try:
        with tempfile.TemporaryDirectory(prefix="pv-ray-eval-") as tmp:
            store.fetch(identity_id, tmp)  # verified against the completion mark
            return evaluator.evaluate(identity_id, metadata, tmp)
    except EvaluationSkip as e:
        return IdentityEvaluation(identity_id, "skipped", reason=str(e))
    except (AdapterStoreError, AdapterFileError) as e:
        return IdentityEvaluation(identity_id, "failed", reason=str(e))


def _log_identity(tracker: Tracker, parent: str, evaluation_id: str, result: IdentityEvaluation) -> str:
    """The identity's nested MLflow run under the evaluation; returns its run id."""
    with tracker.identity_run(parent, result.identity_id, evaluation_id) as run:
        # No class word, nor the prompts written with it: it may be inferred from the face.
        run.set_tags({TAG_TASK: "evaluate"})
        run.log_params({"eval_prompt_count": len(result.eval_prompts)})
        run.log_metrics(_finite_metrics(result), step=0)
        return run.run_id


def _summary_metrics(summary, results) -> dict[str, float]:
    """The evaluation run's metrics: the finite means and the counts per status."""
    means = {f"{m}_{v}_mean": s[v]["mean"] for m, s in summary.items() for v in VARIANTS if math.isfinite(s[v]["mean"])}
    statuses = [r.status for r in results]
    return {**means, **{f"identities_{s}": statuses.count(s) for s in ("done", "skipped", "failed")}}
