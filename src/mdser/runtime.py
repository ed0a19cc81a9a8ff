"""What a run runs on, and where the user's repository is: the bottom floor every stage may use.

`configure` sets TensorFlow up the same way for training, evaluation and prediction
(op determinism, one thread per op, the precision policy, the distribution strategy);
`device_name`, `cpu_name`, `cpu_model` and `cpu_flags` describe the machine for MLflow's tags and
the benchmark; `main_repo_root` finds the user's repository from a DVC queue's copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The instruction-set extensions that change which kernels oneDNN/Eigen pick, and so the
# last bits of a float result (the README's "Across machines").
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def main_repo_root(path: Path | None = None) -> Path:
    """The user's repository, also from inside a DVC queue's temporary copy."""
    path = (path or Path.cwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def configure(train: dict[str, Any]) -> Any:
    """Op determinism, one thread per op, the precision policy, and the distribution strategy.

    Several GPUs: `tf.distribute.MirroredStrategy` over all of them (data parallel,
    `train.batch_frames` is the global batch). Otherwise the default strategy: the
    first GPU when there is one, else the CPU.
    """
    import keras
    import tensorflow as tf

    try:  # one thread per op: results do not depend on how many folds train at once
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running in this process: already set
        pass
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if train["mixed_precision"] else "float32"
    )
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    return tf.distribute.get_strategy()


def cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The GPUs TensorFlow sees, else `cpu_name()`."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)}x GPU {details.get('device_name', gpus[0].name)}"
    return cpu_name()


def cpu_name() -> str:
    """The CPU and its core count, as the `device` tag names it (no TensorFlow import)."""
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def cpu_flags() -> str:
    """The `ISA_FLAGS` this CPU has, space-separated ("" where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return ""
