"""Run a Ray Serve application from its import path, as `serve run` does, for `pv-ray serve`.

The application is found by its import path (`serving.app:app_builder`, the one Serve configs
name) and built from the same `args` a config's application gets, so the CLI and
`serve run serving/config.yaml` size and configure the service in one place.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

SERVING_APP = "serving.app:app_builder"


def run_service(
    args: dict[str, Any],
    *,
    host: str,
    port: int,
    import_path: str = SERVING_APP,
    on_ready: Callable[[str, str], None] | None = None,
) -> None:
    """Start a local Ray (if none is connected), Serve on `host:port`, deploy the application and
    block until interrupted; `on_ready(url, ray_address)` once it serves."""
    import ray
    from ray import serve

    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(builder(args), name="pv-ray", route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}", ray.get_runtime_context().gcs_address)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
