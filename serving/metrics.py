"""The service's own metrics, exported through Ray's Prometheus endpoint (and its dashboard).

Generator replicas use Ray Serve's custom metrics (`ray.serve.metrics`, tagged with the
application, deployment and replica); the job board, a plain Ray actor, uses `ray.util.metrics`.
Prometheus sees each as `ray_<name>` (counters with a `_total` suffix).
"""

from ray.serve import metrics as serve_metrics
from ray.util import metrics as ray_metrics

SECONDS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


class GeneratorMetrics:
    """One replica's counters and timings."""

    def __init__(self):
        self.cache_hits = serve_metrics.Counter(
            "pv_ray_adapter_cache_hits", description="Requests whose identity adapter was in the replica's cache."
        )
        self.cache_misses = serve_metrics.Counter(
            "pv_ray_adapter_cache_misses", description="Requests whose identity adapter was read from the store."
        )
        self.load_seconds = serve_metrics.Histogram(
            "pv_ray_adapter_load_seconds",
            description="Reading and checking an adapter from the store.",
            boundaries=SECONDS,
        )
        self.swap_seconds = serve_metrics.Histogram(
            "pv_ray_adapter_swap_seconds",
            description="Copying an identity's weights into the adapter.",
            boundaries=SECONDS,
        )
        self.step_seconds = serve_metrics.Histogram(
            "pv_ray_generation_step_seconds", description="One denoising step of a generation.", boundaries=SECONDS
        )
        self.generation_threads = serve_metrics.Gauge(
            "pv_ray_generation_threads",
            description="Generation threads running on the replica: at most one, the one holding it.",
        )
        self.steps_after_cancel = serve_metrics.Histogram(
            "pv_ray_generation_steps_after_cancel",
            description="Denoising steps a generation ran after its request was cancelled (it stops at the next one).",
            boundaries=[1, 2, 5, 10, 50],
        )


class JobMetrics:
    """The job board's gauges (jobs per state) and counter of finished jobs (per status)."""

    def __init__(self):
        self.jobs = ray_metrics.Gauge("pv_ray_jobs", description="Video jobs by state.", tag_keys=("state",))
        self.finished = ray_metrics.Counter(
            "pv_ray_jobs_finished", description="Video jobs finished, by status.", tag_keys=("status",)
        )
