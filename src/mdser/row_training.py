"""Train one ablation row: every selected fold, in parallel workers, through a resume cache.

`train_row` is what the `train@<row>` stage runs. Each fold is trained by
`training.fit_with_smaller_batches_on_oom` in its own thread with its own traced
`RowTrainer`; every TensorFlow op runs on one thread (`runtime.configure`), so the result
does not depend on how many folds train at once. A finished fold is kept under
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
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.console import progress_bar
from mdser.runtime import configure, cpu_flags, device_name
from mdser.splits import encode_labels, fold_members
from mdser.training import KERAS_GLOBALS, STOP, RowTrainer, fit_with_smaller_batches_on_oom


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


def fold_workers(runtime: dict[str, Any], n_folds: int) -> int:
    """Folds trained at once: `runtime.workers` (0 = one per core); one on a GPU."""
    import os

    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return 1
    return max(1, min(n_folds, runtime["workers"] or os.cpu_count() or 1))


def train_in_threads(train_fold: Any, folds: list[dict[str, Any]], workers: int) -> None:
    """`train_fold` for every fold, `workers` at a time; the first error (or a signal in
    this thread) stops the others at their next batch."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, "fold") as pool:
        futures = [pool.submit(train_fold, fold) for fold in folds]
        try:
            for future in futures:
                future.result()  # in fold order
        except BaseException:
            STOP.set()
            for future in futures:
                future.cancel()
            raise


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

    Folds are independent: `runtime.workers` threads train them at once, each with its
    own traced model, and every TensorFlow op runs on one thread (see `configure`), so
    the result does not depend on how many train at once. Each finished fold is kept
    under `resume_dir/<key>/` and the fold in progress keeps its state after every
    epoch, so an interrupted stage resumes from the last completed epoch; the key
    hashes the row's parameters, the fold, the feature values and this library's code,
    so a changed input or code never gets an old fold back. The row's resume state is
    removed once every fold is done.
    """
    import tensorflow as tf

    from mdser.stores import (
        FEATURES_FILE,
        TEST_PROBABILITIES_FILE,
        atomic_dir,
        open_fold_features,
        sha256_file,
    )

    train, classes = params["train"], folds_doc["classes"]
    index, frames, meta, selected = open_fold_features(feature_store, folds_doc, train["folds"])
    head_params = params[model_params["head"]]
    inputs = [model_params, train, head_params, meta, sha256_file(feature_store / FEATURES_FILE),
              code_digest(), classes]
    keys = {fold["fold"]: fold_key(*inputs, fold) for fold in selected}
    resume_dir.mkdir(parents=True, exist_ok=True)
    pending = [f for f in selected if not (resume_dir / keys[f["fold"]] / "fold.json").exists()]
    configure(train)
    trainers: dict[int, RowTrainer] = {}

    def train_fold(fold: dict[str, Any]) -> None:
        thread = threading.get_ident()
        if thread not in trainers:
            with KERAS_GLOBALS:
                trainers[thread] = RowTrainer(model_params, train, head_params, len(classes), frames.shape[1])
        trainer, key = trainers[thread], keys[fold["fold"]]
        members = fold_members(index, fold)
        fit_members = {"train": members["train"], "val": members["val"], "all": index}
        labels = {r: encode_labels(members[r], classes) for r in ("train", "val")}
        best, history, stats = fit_with_smaller_batches_on_oom(
            trainer, train, frames, fit_members, labels, len(classes), fold["fold"], row,
            checkpoint=resume_dir / f"{key}.epoch",
        )
        with atomic_dir(resume_dir / key) as tmp:
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
        folds_done.update()

    workers = fold_workers(params["runtime"], len(pending))
    with progress_bar(f"train {row}", len(pending), "fold") as folds_done:
        if workers == 1:  # in this thread: a signal stops the fold where it is
            for fold in pending:
                train_fold(fold)
        else:
            train_in_threads(train_fold, pending, workers)
    results = []
    for fold in selected:
        target = out / f"fold_{fold['fold']}"
        shutil.copytree(resume_dir / keys[fold["fold"]], target)
        results.append(json.loads((target / "fold.json").read_text()))
    for key in keys.values():
        shutil.rmtree(resume_dir / key)
    return results
