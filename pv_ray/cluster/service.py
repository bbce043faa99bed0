"""Run a Ray Serve application from its import path, as `serve run` does, for `pv-ray serve`.

The application is found by its import path (`serving.app:app_builder`, the one Serve configs
name) and built from the same `args` a config's application gets, so the CLI and
`serve run serving/config.yaml` size and configure the service in one place.
"""

from __future__ import annotations

import importlib
import signal
import time
from collections.abc import Callable
from typing import Any

from pv_ray.errors import InputError

SERVING_APP = "serving.app:app_builder"


def run_service(
    args: dict[str, Any],
    *,
    host: str,
    port: int,
    import_path: str = SERVING_APP,
    on_ready: Callable[[str, str], None] | None = None,
    require_api_key: bool = False,
) -> None:
    """Start a local Ray (if none is connected), Serve on `host:port`, deploy the application and
    block until interrupted; `on_ready(url, ray_address)` once it serves. With `require_api_key`,
    it stops (InputError) unless the running service refuses a request without the key."""
    import ray
    from ray import serve

    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    # SIGTERM (kill, systemd, a container stop) stops it as Ctrl-C does: Serve shut down, the local
    # Ray stopped at exit. Set after ray.init, whose handler would dump a native stack and leave
    # Ray's agents running.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(builder(args), name="pv-ray", route_prefix="/")
        if require_api_key:
            check_key_required(host, port)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}", ray.get_runtime_context().gcs_address)
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def check_key_required(host: str, port: int) -> None:
    """InputError unless the service on `host:port` answers 401 to a request without a key. The
    ingress reads the key from its replica's environment, which a Ray cluster started elsewhere
    (RAY_ADDRESS, or a `ray start` on this machine that `ray.init` joined) does not share."""
    import urllib.error
    import urllib.request

    from serving.guard import API_KEY_ENV

    local = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/v1/identities?limit=1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the service
    try:
        opener.open(url, timeout=60).close()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            return
        raise InputError(f"could not confirm that the service requires {API_KEY_ENV}: {url} said {e.code}") from None
    except OSError as e:
        raise InputError(f"could not confirm that the service requires {API_KEY_ENV}: {url}: {e}") from None
    raise InputError(
        f"the service answered without {API_KEY_ENV}: its Ray cluster's processes lack the key set here "
        f"(connected to a cluster started elsewhere?); set {API_KEY_ENV} in that cluster's environment"
    )
