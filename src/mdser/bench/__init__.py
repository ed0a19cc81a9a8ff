"""The benchmark package (``python -m mdser.bench``): time to the ablation table.

Shared by its modules: ``ROOT`` (the repository root) and ``log`` (the progress line).
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

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
