"""A batch driver whose Ray workers fail one identity's analysis with a RuntimeError.

Run as `python analysis_fault.py RAY_ADDRESS INPUT OUTPUT CONFIG [OVERRIDE ...]`: it joins the
cluster at RAY_ADDRESS as a job of its own, whose `worker_process_setup_hook` makes the reference
analysis raise in every worker process of the job (Ray Data's included) for the photo set that
holds a photo named `TRIGGER`, then runs the batch job as `pv-ray personalize` does and exits.
The fault is injected where analysis really runs, in the cluster's worker processes.
"""

from __future__ import annotations

import sys

TRIGGER = "raise-runtime-error.png"


def fail_the_analysis_of_the_triggered_identity() -> None:
    """The setup hook: patch the face analysis in this worker process."""
    from pv_ray.faces.analysis import FaceAnalyzer

    real_reference = FaceAnalyzer.reference

    def reference(self, photos):
        if TRIGGER in photos:
            raise RuntimeError("injected fault in the reference analysis")
        return real_reference(self, photos)

    FaceAnalyzer.reference = reference


def main(address: str, input_uri: str, output_uri: str, config: str, *overrides: str) -> None:
    import ray

    from pv_ray.cluster.batch import run_batch
    from pv_ray.config import load_config

    # Defined in __main__, the hook travels to the workers by value: nothing to import there.
    ray.init(
        address=address,
        runtime_env={"worker_process_setup_hook": fail_the_analysis_of_the_triggered_identity},
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        run_batch(load_config(config, list(overrides)), input_uri, output_uri, workers=1)
    finally:
        ray.shutdown()  # disconnects this driver; the cluster is the test's


if __name__ == "__main__":
    main(*sys.argv[1:])
