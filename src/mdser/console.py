"""What a stage prints: progress bars, and stderr without TensorFlow's start-up noise.

`progress_bar` is tqdm set to show on a terminal and stay silent in a log (CI, DVC
queue workers).

TensorFlow's C++ side writes lines that read like failures on every CPU run
(`failed call to cuInit`, `remapper failed: ... Mutation::Apply error`, the oneDNN and
instruction-set notes, "All log messages before absl::InitializeLog()"). They are
printed before any Python logging is set up and `TF_CPP_MIN_LOG_LEVEL` does not reach
all of them, so `quiet_native_logs` routes file descriptor 2 through a separate
filter process (`python -m mdser.console`) that drops exactly the lines matching
`NOISE` and passes every other byte through at once. Being a process of its own,
it still passes on everything if the stage dies. `MDSER_TF_LOGS=all` turns it off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

HEAD = r"[IWE]\d{4} [\d:.]+\s+\d+ "  # absl's prefix: level, date, time, thread
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rf"|{HEAD}(port|cudart_stub|cpu_feature_guard)\.cc:\d+\]"
    rf"|{HEAD}cuda_platform\.cc:\d+\] failed call to cuInit"
    rf"|{HEAD}devices\.cc:\d+\] Number of eligible GPUs"
    rf"|{HEAD}single_machine\.cc:\d+\] Starting new session"
    rf"|{HEAD}meta_optimizer\.cc:\d+\] remapper failed: INVALID_ARGUMENT: Mutation::Apply error"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow)"
)


def progress_bar(desc: str, total: int, unit: str = "file") -> Any:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, disable=None, leave=False, mininterval=0.5)


def is_noise(line: str) -> bool:
    return NOISE.search(line) is not None


def filter_stream(source: Any, sink: Any) -> None:
    """Copy lines from `source` to `sink`, dropping the noise lines."""
    for raw in iter(source.readline, b""):
        if not is_noise(raw.decode("utf-8", "replace")):
            sink.write(raw)
            sink.flush()


def quiet_native_logs() -> None:
    """Route this process's fd 2 through the filter process (once; not when MDSER_TF_LOGS=all)."""
    if os.environ.get("MDSER_TF_LOGS") == "all" or os.environ.get("_MDSER_FILTERED") == "1":
        return
    os.environ["_MDSER_FILTERED"] = "1"  # child processes inherit the filtered fd 2 already
    sys.stderr.flush()
    proc = subprocess.Popen([sys.executable, "-m", "mdser.console"], stdin=subprocess.PIPE,
                            stdout=sys.stderr.fileno(), close_fds=True)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()  # fd 2 is now the only writer: the filter ends when this process does


if __name__ == "__main__":
    filter_stream(sys.stdin.buffer, sys.stdout.buffer)
