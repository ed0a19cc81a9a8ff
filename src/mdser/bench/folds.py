"""Fold-epoch throughput of the default profile, and how busy the cores are while training.

Three ways to train the same folds, each in a fresh interpreter (TensorFlow's thread pools
are fixed when it starts):

* ``reference``: one fold after another, every op on all cores (TensorFlow's default), the
  model built from the layers of that time (`bench.reference`) and TensorFlow's own choice
  of CPU kernels (`tensorflow_onednn_default`) — the training step as it was when the
  training-speed issue was filed, kept as the benchmark's reference path;
* ``sequential``: `row_training.train_row` with `runtime.workers: 1` — one fold after
  another, one thread per op (`runtime.configure`; independent ops still run at once);
* ``processes``: `train_row` with `runtime.workers: 0` — one fold process per core
  (`row_training.start_fold_process`: one thread per op and for the graph), each training
  its share of the folds; their utterances over the slowest one's wall time.

Each trains the default profile's `RowTrainer` for a few epochs on each of the same folds
of synthetic IEMOCAP-like utterances (after one traced warm-up step per trainer), and
reports utterances per second, useful FLOP/s (analytic, real frames: `bench.flops`) and
the process's CPU time over wall time x cores. Several
epochs because a real fold runs at least `train.start_from_epoch` + `train.patience` of
them: a fold's first epoch also pays for the kernels of each new batch shape (oneDNN
generates code per shape), which one-epoch folds would overweight. The results of
`train_row` do not depend on `runtime.workers` (one thread per op), so the faster way can
be the default.

    python -m mdser.bench.folds {reference,sequential,processes} UTTERANCES_PER_FOLD FOLDS EPOCHS [PART PARTS]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from typing import Any

from mdser.bench import ROOT, print_result, read_result

MODES = ("reference", "sequential", "processes")
# TensorFlow turns oneDNN on by itself only for CPUs with these (its 2.9 release notes:
# "CPUs with neural-network-focused hardware features such as AVX512_VNNI, AVX512_BF16,
# and AMX"); `mdser` turns it on everywhere (src/mdser/__init__.py).
ONEDNN_BY_DEFAULT = {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tensorflow_onednn_default() -> str:
    """TF_ENABLE_ONEDNN_OPTS as TensorFlow would choose it on this CPU: "1" or "0"."""
    from pathlib import Path

    try:
        flags = next(line.split(":", 1)[1].split() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    return "1" if ONEDNN_BY_DEFAULT & set(flags) else "0"


def fold_epochs(mode: str, n_utts: int, n_folds: int, epochs: int, part: int = 0,
                parts: int = 1) -> dict[str, Any]:
    """`epochs` epochs on folds `part`, `part + parts`, ... of `n_folds` folds of `n_utts`
    utterances, trained the `mode` way (in this process)."""
    import contextlib

    import numpy as np
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from mdser.batching import length_batches
    from mdser.bench.data import IEMOCAP, no_standardization, synthetic_set
    from mdser.bench.reference import reference_layers
    from mdser.bench.training import Trainer, profiles
    from mdser.params import load_params
    from mdser.row_training import start_fold_process
    from mdser.training import class_weights, frozen_heap

    params = load_params(ROOT / "params.yaml")
    model_params, train = profiles(params)["default"], params["train"]
    if mode == "reference":
        tf.config.threading.set_intra_op_parallelism_threads(0)  # all cores per op
        tf.constant(0.0)  # TensorFlow starts now: `configure` can no longer change it
    if mode == "processes":
        start_fold_process(None)
    n_classes, n_mels = IEMOCAP["classes"], params["features"]["n_mels"]
    mean, std = no_standardization()
    folds = []
    for k in range(n_folds):
        lengths, frames, rows, labels = synthetic_set(n_utts, n_mels, n_classes, seed=k)
        weights = class_weights(labels, n_classes, train["class_weight_alpha"]).astype(np.float32)
        groups = length_batches(lengths, train["batch_frames"], np.random.default_rng(k))
        folds.append((frames, rows, labels, weights, groups))
    with reference_layers() if mode == "reference" else contextlib.nullcontext():
        trainer = Trainer(model_params, train, params[model_params["head"]], n_classes, n_mels)
    frames, rows, labels, weights, groups = folds[0]
    trainer.run(frames, rows, labels, weights, groups[:1], mean, std)  # trace + warm-up

    mine, useful_flop = folds[part::parts], 0.0
    with frozen_heap() if mode != "reference" else contextlib.nullcontext():  # as `train_row`
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for frames, rows, labels, weights, groups in mine:
            for _ in range(epochs):
                run = trainer.run(frames, rows, labels, weights, groups, mean, std)
                useful_flop += run["useful_flops"] * run["wall_s"]
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    cores = os.cpu_count() or 1
    trained = len(mine) * n_utts * epochs
    return {"mode": mode, "workers": parts, "folds": len(mine), "epochs": epochs,
            "utterances": trained, "wall_s": wall, "utt_per_s": trained / wall, "cpu_s": cpu,
            "cpu_utilisation": cpu / (wall * cores), "cores": cores,
            "useful_flop": useful_flop, "useful_flops": useful_flop / wall,
            "onednn": bool(_pywrap_util_port.IsMklEnabled())}


def in_fresh_processes(mode: str, n_utts: int, n_folds: int, epochs: int,
                       parts: int = 1) -> dict[str, Any]:
    """`fold_epochs` in `parts` new interpreters at once (their own TensorFlow thread pools),
    each on its share of the folds: their utterances over the slowest one's wall time."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    if mode == "reference":
        env["TF_ENABLE_ONEDNN_OPTS"] = tensorflow_onednn_default()
    procs = [subprocess.Popen([sys.executable, "-m", "mdser.bench.folds", mode, str(n_utts),
                               str(n_folds), str(epochs), str(part), str(parts)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for part in range(parts)]
    runs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"fold-epoch job {mode} failed ({proc.returncode}):\n{err[-3000:]}")
        runs.append(read_result(out))
    wall, cpu = max(r["wall_s"] for r in runs), sum(r["cpu_s"] for r in runs)
    trained, useful = sum(r["utterances"] for r in runs), sum(r["useful_flop"] for r in runs)
    return runs[0] | {"workers": parts, "folds": n_folds, "utterances": trained, "wall_s": wall,
                      "utt_per_s": trained / wall, "cpu_s": cpu, "useful_flop": useful,
                      "useful_flops": useful / wall,
                      "cpu_utilisation": cpu / (wall * runs[0]["cores"])}


def median_round(speedups: list[float]) -> int:
    """Index of the round whose speed-up is the median (the lower middle for an even count)."""
    return sorted(range(len(speedups)), key=speedups.__getitem__)[(len(speedups) - 1) // 2]


def fold_throughput(n_utts: int, n_folds: int, epochs: int, workers: int,
                    rounds: int = 1) -> dict[str, Any]:
    """Every way on the same folds, `rounds` times in turn (reference, sequential, processes,
    reference, ...), so that the ways of one round share the machine's hour: on a shared
    virtual machine one round's ratio moves by a quarter from one run to the next.
    `default` is the way `runtime.workers` = `workers` picks; `speedups` each round's
    default-over-reference ratio, `speedup` their median, and each way's figures are those
    of the median round."""
    from mdser.row_training import fold_workers

    parts = fold_workers({"workers": 0}, n_folds)
    default = "sequential" if workers == 1 else "processes"
    per_round = [{mode: in_fresh_processes(mode, n_utts, n_folds, epochs,
                                           parts if mode == "processes" else 1)
                  for mode in MODES} for _ in range(rounds)]
    speedups = [r[default]["utt_per_s"] / r["reference"]["utt_per_s"] for r in per_round]
    middle = median_round(speedups)
    return per_round[middle] | {"default": default, "speedup": speedups[middle],
                                "speedups": speedups}


def main(argv: list[str] | None = None) -> None:
    mode, *numbers = argv or sys.argv[1:]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, got {mode!r}")
    print_result(fold_epochs(mode, *map(int, numbers)))


if __name__ == "__main__":
    main()
