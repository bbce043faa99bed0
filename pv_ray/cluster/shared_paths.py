"""On a cluster of several nodes, prove that the local paths a job writes to are shared.

A local `--output` (or an sqlite tracking store) on a multi-node cluster is only right when it
is a shared mount: otherwise each node's workers would write adapters and runs to their own
disk, and the driver would report work it cannot see. Before any work, the driver writes a
marker file with a random token into each such folder and asks one task pinned to every alive
node to read it back; a node that cannot stops the job with what to use instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pv_ray.errors import InputError

MARKER_PREFIX = ".pv-ray-shared-"
CHECK_TIMEOUT_S = 120


class PathNotShared(InputError):
    """A local path that some worker node of the cluster cannot see."""


@ray.remote(num_cpus=0)
def _read_markers(markers: dict[str, str], token: str) -> list[str]:
    """The markers (by what they check) this node cannot read back with `token`."""
    missing = []
    for what, path in markers.items():
        try:
            if Path(path).read_text() != token:
                missing.append(what)
        except OSError:
            missing.append(what)
    return missing


def check_shared(folders: dict[str, str]) -> None:
    """Raise `PathNotShared` unless every alive node sees each of `folders` (what it is -> a local
    folder). Nothing to check on a single node, or without local folders."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or not folders:
        return
    token = uuid.uuid4().hex
    markers = {}
    for what, folder in folders.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
        markers[what] = os.path.join(folder, MARKER_PREFIX + token)
        Path(markers[what]).write_text(token)
    try:
        checks = {
            f"{node['NodeManagerAddress']} {node['NodeID'][:8]}": _read_markers.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(markers, token)
            for node in nodes
        }
        unseen = {address: ray.get(ref, timeout=CHECK_TIMEOUT_S) for address, ref in checks.items()}
    finally:
        for path in markers.values():
            Path(path).unlink(missing_ok=True)
    problems = [f"{what} {folders[what]} (node {address})" for address, whats in unseen.items() for what in whats]
    if problems:
        raise PathNotShared(
            f"this cluster has {len(nodes)} nodes, and some cannot see the local folders of this job: "
            f"{'; '.join(problems)}. Use storage every node reaches: s3:// or gs:// (or a shared mount) "
            "for --input and --output, and --tracking-uri http://<mlflow server> for tracking"
        )
