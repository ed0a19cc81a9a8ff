"""The benchmark package (``python -m mdser.bench``): time to the ablation table.

Shared by its modules: ``ROOT`` (the repository root), ``log`` (the progress line), and
``print_result`` / ``read_result``, how a job run in a fresh process hands back its result
(one ``@@``-marked JSON line on stdout), and ``run_job``, which runs such a job.
The package itself imports nothing heavy, so that ``python -m mdser.bench.features`` (the
feature-extraction job, run in a fresh process) pays only for its own imports.

Modules: ``machine`` (machine facts, matmul peak, samplers of memory and GPU use),
``flops`` (analytic FLOP counts), ``data`` (synthetic lengths, stores and corpora),
``training`` (train-step timings through the library's ``RowTrainer``), ``features``
(feature extraction vs a plain librosa loop), ``growth`` (epoch time and store size vs
corpus size), ``pipeline`` (repository copy and ``dvc`` timings), ``gpu`` (GPU figures
and the projected ablation), ``report`` (targets, verdicts, Markdown), ``__main__``
(command line and orchestration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


RESULT_MARK = "@@"


def print_result(result: dict[str, Any]) -> None:
    """A fresh-process job's result, as the one marked line its parent reads."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def read_result(stdout: str) -> dict[str, Any]:
    """The result a job printed with `print_result` (its other output is ignored)."""
    line = next(x for x in stdout.splitlines() if x.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):])


def run_job(module: str, *args: str, **env: str) -> str:
    """Run ``python -m module args`` in a fresh interpreter (this repository's ``src`` first
    on its path, `env` added to the environment); its stdout, or an error with its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT / "src")} | env)
    if proc.returncode:
        raise RuntimeError(f"{module} job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
