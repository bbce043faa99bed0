"""Ingest on Ray Data: identity folders → analysed rows, streamed into the tuning workers.

The driver lists `root/<identity_id>/` with fsspec (names that are not valid identity ids are
rejected there and never used as paths). A lazy Ray Data pipeline then reads and analyses each
identity (`pv_ray.batch.rows.IdentityAnalyzer`) on a pool of actors in Ray Data's callable-class
form: each actor loads the face models once, when the pool starts, and keeps them for every
identity it gets; Ray Data restarts an actor that dies and retries its row. It streams into the
tuning workers: tuning starts with the first analysed identity, not after the last. The map never
raises: an exception would fail the dataset, and the tuning of every identity with it.
"""

from __future__ import annotations

import logging
from typing import Any

from pv_ray.batch.rows import IdentityAnalyzer, describe, failed_row
from pv_ray.config import PVConfig

logger = logging.getLogger(__name__)


class AnalyzeIdentities:
    """Ray Data's callable class: one per pool actor, the face models loaded in its constructor.
    Never raises: models that cannot load fail each identity with the reason, rather than the
    actor (which Ray Data would restart, failing the same way, until the dataset gives up)."""

    def __init__(self, config: dict, storage_options: dict | None):
        self.analyzer: IdentityAnalyzer | None = None
        self.load_error = ""
        try:
            self.analyzer = IdentityAnalyzer(config, storage_options)
        except Exception as e:
            logger.exception("loading the face models failed")
            self.load_error = f"the face models could not be loaded ({describe(e)})"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.analyzer is None:
            return failed_row(row["identity_id"], self.load_error)
        return self.analyzer(row)


def analysis_dataset(
    cfg: PVConfig,
    folders: list[tuple[str, str]],
    *,
    storage_options: dict | None = None,
    concurrency: int = 2,
    num_cpus: float = 1,
):
    """The lazy Ray Data pipeline that reads and analyses `folders` ((identity id, uri) pairs) on
    `concurrency` actors (fewer for fewer folders), each holding `num_cpus` for the whole job;
    nothing runs until it is iterated."""
    import ray
    import ray.data

    # Ray Data sets up its own logger on import and prints each operator's progress: the CLI has its own.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items([{"identity_id": i, "uri": u} for i, u in folders], override_num_blocks=len(folders))
    return ds.map(
        AnalyzeIdentities,
        fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "storage_options": storage_options},
        compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(folders)))),
        num_cpus=num_cpus,
    )
