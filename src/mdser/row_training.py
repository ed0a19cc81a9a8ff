"""Train one ablation row: every selected fold, in parallel workers, through a resume cache.

`train_row` is what the `train@<row>` stage runs. Each fold is trained by
`training.fit_with_smaller_batches_on_oom`, on a CPU in one of `runtime.workers` spawned
processes, each with its own traced `RowTrainer` and one core; every TensorFlow op runs on
one thread (`runtime.configure`), so the result does not depend on how many folds train
at once. A finished fold is kept under
`.cache/resume/<row>/<key>/`, keyed by `fold_key` over everything its result depends on —
the row's parameters, the fold, the feature values and this library's code
(`code_digest`) — and the fold in progress keeps its state after every epoch, so an
interrupted stage resumes where it stopped and never gets back a result that the current
code and data would not produce.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.console import progress_bar
from mdser.errors import UserError
from mdser.features import input_frames
from mdser.runtime import cpu_flags, device_name
from mdser.splits import encode_labels, fold_members
from mdser.training import RowTrainer, fit_with_smaller_batches_on_oom


def code_digest() -> str:
    """A hash of every module of this library: a fold trained by other code is never reused."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fold_key(*parts: Any) -> str:
    """A content hash of everything a fold's result depends on (for resuming)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def gpu_present() -> bool:
    """An NVIDIA GPU this process may use, seen without starting TensorFlow (which a
    process must not have started before it spawns fold processes)."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def fold_workers(runtime: dict[str, Any], n_folds: int) -> int:
    """Folds trained at once: `runtime.workers` (0 = one per core); one on a GPU."""
    import os

    if gpu_present():
        return 1
    return max(1, min(n_folds, runtime["workers"] or os.cpu_count() or 1))


def start_fold_process(stop: Any = None) -> None:
    """A fold process: every TensorFlow op and the graph itself on one thread (the
    processes use one core each), and the stage's stop event as `training.STOP`."""
    import tensorflow as tf

    from mdser import training

    tf.config.threading.set_inter_op_parallelism_threads(1)
    if stop is not None:
        training.STOP = stop


def train_in_processes(work: Any, jobs: list[tuple], workers: int, on_done: Any) -> None:
    """`work(*job)` for every job in `workers` spawned processes (the stage's process
    never starts TensorFlow). Results are awaited in job order, so the error raised is the
    one a sequential run would raise; an error or a signal here stops the other folds at
    their next batch."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(workers, context, start_fold_process, (stop,)) as pool:
        futures = [pool.submit(work, *job) for job in jobs]
        try:
            for future in futures:
                future.result()
                on_done()
        except BaseException as exc:
            stop.set()
            for future in futures:
                future.cancel()
            if isinstance(exc, BrokenProcessPool):
                raise UserError("a fold process ended abruptly (killed, or out of memory); "
                                "`dvc repro` resumes from the last completed epoch") from exc
            raise


# What a process keeps from one fold of the row to its next: the features and a traced trainer.
PROCESS_CACHE: dict[str, Any] = {}


def train_fold(
    params: dict[str, Any], row: str, model_params: dict[str, Any], feature_store: Path,
    folds_doc: dict[str, Any], fold: dict[str, Any], done_dir: Path, checkpoint: Path,
) -> None:
    """Train one fold and keep its selected model, test-speaker probabilities, history,
    range-test curve and stats in `done_dir` (written atomically); its state after each
    epoch goes to `checkpoint`. Runs in the stage's process or in a fold process."""
    import tensorflow as tf

    from mdser.stores import TEST_PROBABILITIES_FILE, atomic_dir, open_fold_features

    train, classes = params["train"], folds_doc["classes"]
    if not PROCESS_CACHE:  # this process's first fold of the row
        index, frames, meta, _ = open_fold_features(feature_store, folds_doc, train["folds"])
        frames = input_frames(frames, index, train["standardize"])  # once per process
        trainer = RowTrainer(model_params, train, params[model_params["head"]], len(classes),
                             frames.shape[1])
        PROCESS_CACHE.update(index=index, frames=frames, trainer=trainer,
                             sample_rate=meta["sample_rate"])
    index, frames = PROCESS_CACHE["index"], PROCESS_CACHE["frames"]
    trainer = PROCESS_CACHE["trainer"]
    members = fold_members(index, fold)
    fit_members = {"train": members["train"], "val": members["val"], "all": index}
    labels = {r: encode_labels(members[r], classes) for r in ("train", "val")}
    best, history, stats = fit_with_smaller_batches_on_oom(
        trainer, train, frames, fit_members, labels, len(classes), fold["fold"], row,
        checkpoint=checkpoint, sample_rate=PROCESS_CACHE["sample_rate"],
    )
    with atomic_dir(done_dir) as tmp:
        trainer.model.set_weights(best)
        trainer.model.save_weights(tmp / "model.weights.h5")
        score_test_speaker(trainer, frames, members["test"], stats, classes,
                           train["batch_frames"]).to_csv(
            tmp / TEST_PROBABILITIES_FILE, index=False, float_format="%.9g", lineterminator="\n")
        pd.DataFrame(history).to_csv(tmp / "history.csv", index=False, lineterminator="\n")
        curve = stats.pop("range_test")
        pd.DataFrame(curve, columns=["step", "lr", "train_loss", "train_ua", "val_ua"]).to_csv(
            tmp / "range_test.csv", index=False, lineterminator="\n")
        stats |= {"fold": fold["fold"], "device": device_name(), "cpu_flags": cpu_flags(),
                  "tensorflow": tf.__version__, "replicas": trainer.replicas}
        (tmp / "fold.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def score_test_speaker(
    trainer: RowTrainer, frames: np.ndarray, test: pd.DataFrame, stats: dict[str, Any],
    classes: list[str], batch_frames: int,
) -> pd.DataFrame:
    """The fold's selected model applied to its test speaker, once training and model
    selection (which never read it) are done: utt_id and one probability column per class.
    `evaluate` reads this table instead of rebuilding and re-tracing the model."""
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    probs = trainer.predict(frames, test, mean, std, batch_frames)
    return pd.DataFrame(probs, columns=classes).assign(utt_id=test["utt_id"].to_numpy())[
        ["utt_id", *classes]]


def train_row(
    params: dict[str, Any], row: str, model_params: dict[str, Any], feature_store: Path,
    folds_doc: dict[str, Any], out: Path, resume_dir: Path,
) -> list[dict[str, Any]]:
    """Train every selected fold of one ablation row into `out`.

    Folds are independent: on a CPU, `runtime.workers` processes train them at once,
    each with its own traced model, and every TensorFlow op runs on one thread (see
    `configure`), so the result does not depend on how many train at once. Each finished fold is kept
    under `resume_dir/<key>/` and the fold in progress keeps its state after every
    epoch, so an interrupted stage resumes from the last completed epoch; the key
    hashes the row's parameters, the fold, the feature values and this library's code,
    so a changed input or code never gets an old fold back. The row's resume state is
    removed once every fold is done.
    """
    from mdser.stores import FEATURES_FILE, open_fold_features, sha256_file

    train, classes = params["train"], folds_doc["classes"]
    _, _, meta, selected = open_fold_features(feature_store, folds_doc, train["folds"])
    head_params = params[model_params["head"]]
    inputs = [model_params, train, head_params, meta, sha256_file(feature_store / FEATURES_FILE),
              code_digest(), classes]
    keys = {fold["fold"]: fold_key(*inputs, fold) for fold in selected}
    resume_dir.mkdir(parents=True, exist_ok=True)
    PROCESS_CACHE.clear()  # another row's trainer
    jobs = [(params, row, model_params, feature_store, folds_doc, fold, resume_dir / keys[fold["fold"]],
             resume_dir / f"{keys[fold['fold']]}.epoch")
            for fold in selected if not (resume_dir / keys[fold["fold"]] / "fold.json").exists()]
    workers = fold_workers(params["runtime"], len(jobs))
    with progress_bar(f"train {row}", len(jobs), "fold") as folds_done:
        if workers == 1:  # in this process: a signal stops the fold where it is
            for job in jobs:
                train_fold(*job)
                folds_done.update()
        else:
            train_in_processes(train_fold, jobs, workers, folds_done.update)
    results = []
    for fold in selected:
        target = out / f"fold_{fold['fold']}"
        shutil.copytree(resume_dir / keys[fold["fold"]], target)
        results.append(json.loads((target / "fold.json").read_text()))
    for key in keys.values():
        shutil.rmtree(resume_dir / key)
    return results
