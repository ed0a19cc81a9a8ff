"""Machine facts for the benchmark: what it runs on, its float32 matmul peak, and samplers.

`machine_info` (CPU, cores, memory, GPU, versions), `matmul_peak` (best-of-n tf.matmul),
and `Sampler`, one background thread that samples while a block runs, with its two uses:
`PeakMemory` (peak RSS / PSS / anonymous memory of a process tree) and `GpuUtilization`
(mean `nvidia-smi` utilization).
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from typing import Any, Self

import numpy as np


def machine_info() -> dict[str, Any]:
    import keras
    import psutil
    import tensorflow as tf

    from mdser.runtime import cpu_model, device_name

    cpu = cpu_model()
    gpus = tf.config.list_physical_devices("GPU")
    gpu = "none"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        gpu = f"{len(gpus)}x {details.get('device_name', gpus[0].name)}"
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu, "device": device_name(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "platform": platform.platform(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def matmul_peak(n: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` float32 tf.matmul throughput on n x n matrices (FLOP = 2 n^3)."""
    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32)
    b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=tf.float32)
    tf.matmul(a, b).numpy()  # warm-up (thread pool, oneDNN primitives)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "flops": 2.0 * n**3 / best,
            "median_flops": 2.0 * n**3 / float(np.median(times))}


class Sampler:
    """Calls `sample()` every `interval` s on a daemon thread while the `with` block runs.

    `sample()` returns False to stop sampling early (its source is not there)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()

    def sample(self) -> bool:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.sample():
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class PeakMemory(Sampler):
    """Peak memory of a process and all its children, sampled every `interval` s.

    ``peak_rss``: sum of RSS (counts pages shared between a parent and its forked workers
    once per process, and file-backed memory-map pages); ``peak_pss``: sum of PSS (shared
    pages divided among their sharers: the memory the process tree really holds);
    ``peak_anon``: sum of RSS minus shared pages (heap, not memory maps).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        super().__init__(interval)
        self.pid = pid
        self.peak_rss = self.peak_pss = self.peak_anon = 0

    def sample(self) -> bool:
        import psutil

        rss = pss = anon = 0
        try:
            top = psutil.Process(self.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return True
        for p in procs:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
            anon += m.rss - getattr(m, "shared", 0)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_anon = max(self.peak_anon, anon)
        return True

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.sample()  # a last sample (no-op once a monitored process has exited)


class GpuUtilization(Sampler):
    """Mean `nvidia-smi` GPU utilization while the block runs (None without nvidia-smi)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.samples: list[float] = []

    def sample(self) -> bool:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5).stdout.split()
            self.samples.append(float(out[0]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return False
        return True

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None
