"""What the job scripts share: progress lines on stderr, nearest-rank percentiles, a
per-process CPU meter, FLOP counts and identity folders made from the demo portraits."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def counted_flops(fn: Callable[[], object]) -> int:
    """The FLOPs `fn()` runs, counted by torch's FlopCounterMode (on the meta device: no weights needed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stderr_log(benchmark: str) -> Callable[[str], None]:
    """A `log(message)` that prints `[benchmark] message` to stderr (stdout carries the JSON)."""

    def log(message: str) -> None:
        print(f"[{benchmark}] {message}", file=sys.stderr, flush=True)

    return log


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of `values` by the nearest-rank method: always an observed
    value, never interpolated (a p99 of 100 samples is the 99th smallest)."""
    if not values:
        raise ValueError("nearest_rank needs at least one value")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]  # 1e-9: 0.99 * 100 is 99.00000000000001


class ProcessCpuMeter:
    """CPU time of every process on this machine between `start()` and `stop()` (or over a
    `with` block), by process name (Linux `/proc`; elsewhere `by_process()` is None): what the
    training workers got and what everything else (Ray's daemons and helper actors, the driver)
    took from the same cores.

    `/proc` is read every `interval` seconds: a process born after `start()` counts from zero,
    and up to `interval` seconds of one that exits between two reads are lost."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.available = Path("/proc/self/stat").exists()
        self.first: dict[int, int] = {}  # pid -> CPU ticks at the start (absent: born later)
        self.last: dict[int, tuple[str, int]] = {}  # pid -> (name, latest CPU ticks)
        self.seconds = 0.0
        self._started: float | None = None  # monotonic time of start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start measuring (once: a meter measures one window)."""
        if self.available and not self.started:
            self.first = {pid: ticks for pid, (_, ticks) in self._sample().items()}
            self._started = time.monotonic()
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._started is not None

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.last.update(self._sample())
            self.seconds = time.monotonic() - self._started

    def __enter__(self) -> ProcessCpuMeter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def by_process(self, top: int = 16) -> dict[str, dict[str, float]] | None:
        """{name: {"cores": CPU seconds / wall seconds, "processes": count}}, busiest first; the
        rest summed under "(others)"."""
        if not self.available or not self.seconds:
            return None
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        totals: dict[str, list[float]] = {}
        for pid, (name, ticks) in self.last.items():
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += (ticks - self.first.get(pid, 0)) / ticks_per_second / self.seconds
            entry[1] += 1
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
        out = {name: {"cores": round(cores, 3), "processes": n} for name, (cores, n) in ranked[:top]}
        if len(ranked) > top:
            out["(others)"] = {
                "cores": round(sum(c for _, (c, _) in ranked[top:]), 3),
                "processes": sum(n for _, (_, n) in ranked[top:]),
            }
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(self._sample())

    def _sample(self) -> dict[int, tuple[str, int]]:
        sample = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # exited meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            sample[int(entry.name)] = (
                _process_name(args, stat[stat.index("(") + 1 : stat.rindex(")")]),
                int(fields[11]) + int(fields[12]),
            )
        return sample


def _process_name(args: list[bytes], comm: str) -> str:
    """`ray::RayTrainWorker`, `raylet`, `log_monitor.py`: the first argument (Ray names its
    workers there), or the script a Python interpreter runs; kernel threads keep their comm."""
    words = [a.decode(errors="replace") for a in args if a]
    if not words:
        return comm
    name = os.path.basename(words[0].split(" ")[0])
    if name.startswith("python"):
        script = next((w for w in words[1:] if w.endswith(".py")), None)
        if script:
            return os.path.basename(script)
        if "-m" in words[:-1]:
            return words[words.index("-m") + 1]
    return name


def build_identities(root: Path, count: int) -> list[str]:
    """`count` identity folders from the demo portraits: variant k of portrait p is mirrored on
    odd k, its crop shifted by (k // 2) % 16 steps and turned by 2 * (k // 32) degrees, so every
    identity's photos differ (up to 128 variants per portrait)."""
    import json

    from PIL import ImageOps

    from pv_ray.presets.demo import demo_photos

    people = sorted(demo_photos().items())
    ids = []
    for i in range(count):
        name, (portrait, class_word) = people[i % len(people)]
        k = i // len(people)
        base = ImageOps.mirror(portrait) if k % 2 else portrait
        base = base.rotate(2 * (k // 32)) if k >= 32 else base
        shift = 4 * ((k // 2) % 16)
        w, h = base.size
        photo_1 = base.crop((shift, shift, w - shift, h - shift)).resize(base.size)
        photo_2 = ImageOps.mirror(base).crop((16 + shift, 16, w - 16, h - 16 - shift)).resize(base.size)
        identity_id = f"{name}-v{k}"
        folder = root / identity_id
        folder.mkdir(parents=True)
        photo_1.save(folder / "photo-1.png")
        photo_2.save(folder / "photo-2.jpg", quality=92)
        if class_word:
            (folder / "meta.json").write_text(json.dumps({"class": class_word}))
        ids.append(identity_id)
    return ids
