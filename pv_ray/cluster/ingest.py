"""Ingest on Ray Data: identity folders → analysed rows, streamed into the tuning workers.

The driver lists `root/<identity_id>/` with fsspec (names that are not valid identity ids are
rejected there and never used as paths). A lazy Ray Data pipeline then reads and analyses each
identity (`pv_ray.batch.rows.IdentityAnalyzer`) in a pool of tasks (retried if a worker dies;
each worker process loads its insightface `FaceAnalysis` once and keeps it for the next
identities). It streams into the tuning workers: tuning starts with the first analysed identity,
not after the last. The map never raises: an exception would fail the dataset, and the tuning of
every identity with it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pv_ray.batch.rows import IdentityAnalyzer, describe, failed_row
from pv_ray.config import PVConfig

logger = logging.getLogger(__name__)


_ANALYZERS: dict[str, IdentityAnalyzer] = {}  # per worker process, keyed by its settings


def analyze_row(row: dict[str, Any], *, config: dict, storage_options: dict | None) -> dict[str, Any]:
    """Ray Data map function: the row of one identity folder, analysed by this process's analyzer.
    Never raises (a raising map fails the dataset, and Ray Train restarts every worker for it)."""
    key = json.dumps([config, storage_options], sort_keys=True, default=str)
    if key not in _ANALYZERS:
        _ANALYZERS.clear()  # one batch's settings at a time
        try:
            _ANALYZERS[key] = IdentityAnalyzer(config, storage_options)
        except Exception as e:  # the face models cannot load here: each identity fails with the reason
            logger.exception("loading the face models failed")
            return failed_row(row["identity_id"], f"the face models could not be loaded ({describe(e)})")
    return _ANALYZERS[key](row)


def analysis_dataset(
    cfg: PVConfig,
    folders: list[tuple[str, str]],
    *,
    storage_options: dict | None = None,
    concurrency: int = 2,
    num_cpus: float = 1,
):
    """The lazy Ray Data pipeline that reads and analyses `folders` ((identity id, uri) pairs),
    `concurrency` tasks at a time, each holding `num_cpus`; nothing runs until it is iterated."""
    import ray
    import ray.data

    # Ray Data sets up its own logger on import and prints each operator's progress: the CLI has its own.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items([{"identity_id": i, "uri": u} for i, u in folders], override_num_blocks=len(folders))
    return ds.map(
        analyze_row,
        fn_kwargs={"config": cfg.model_dump(mode="json"), "storage_options": storage_options},
        compute=ray.data.TaskPoolStrategy(size=max(1, min(concurrency, len(folders)))),
        num_cpus=num_cpus,
    )
