"""Training procedure (paper section "Model training").

Class-weighted loss (Eq. 15), the triangular cyclical learning rate (Eq. 16-19),
length-bucketed variable-length batches, and checkpoint selection on the
validation speaker's UA. The test speaker is never read here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.errors import UserError
from mdser.evaluation import unweighted_accuracy
from mdser.splits import fold_members

TIME_QUANTUM = 16  # pad batches to a multiple of this many frames: few distinct shapes


# --- Eq. 15 and Eq. 16-19 ---------------------------------------------------------------


def class_weights(labels: np.ndarray, n_classes: int, alpha: float | str = "auto") -> np.ndarray:
    """Eq. 15: r_c = alpha * N / N_c; alpha "auto" = 1 / n_classes (mean weight 1 if balanced)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [c for c in range(n_classes) if counts[c] == 0]
        raise UserError(f"classes {missing} have no training utterance in this fold")
    a = 1.0 / n_classes if alpha == "auto" else float(alpha)
    return a * labels.size / counts


def cyclical_lr(step: Any, stepsize: float, lr_min: float, lr_max: float) -> Any:
    """Eq. 16-19, triangular CLR: works on numpy scalars/arrays and on tensors."""
    import keras.ops as ops

    step = ops.cast(step, "float32")
    cycle = ops.floor(1.0 + step / (2.0 * stepsize))  # Eq. 18
    x = ops.abs(step / stepsize - 2.0 * cycle + 1.0)  # Eq. 17
    return lr_min + (lr_max - lr_min) * ops.maximum(0.0, 1.0 - x)  # Eq. 16


def _clr_schedule(stepsize: int, lr_min: float, lr_max: float) -> Any:
    import keras

    class CyclicalLearningRate(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            return cyclical_lr(step, stepsize, lr_min, lr_max)

        def get_config(self) -> dict[str, Any]:
            return {"stepsize": stepsize, "lr_min": lr_min, "lr_max": lr_max}

    return CyclicalLearningRate()


# --- variable-length batches ------------------------------------------------------------


def length_batches(
    lengths: np.ndarray, batch_frames: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Group utterances of similar length so that batch size x padded length <= batch_frames.

    With `rng`, the order within equal-length buckets and the order of batches is
    shuffled; without, batches are in ascending length (for evaluation).
    """
    lengths = np.asarray(lengths)
    order = np.arange(lengths.size) if rng is None else rng.permutation(lengths.size)
    padded = -(-lengths // TIME_QUANTUM) * TIME_QUANTUM
    order = order[np.argsort(padded[order], kind="stable")]
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, padded[i])
        if current and longest_if * (len(current) + 1) > batch_frames:
            batches.append(np.asarray(current))
            current, longest_if = [], padded[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(np.asarray(current))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def standardization(frames: np.ndarray, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all frames of `rows` (the paper: over the corpus)."""
    total, sq, n = np.zeros(3), np.zeros(3), 0
    for r in rows.itertuples():
        x = frames[int(r.offset) : int(r.offset) + int(r.frames)].astype(np.float64)
        total += x.sum(axis=(0, 1))
        sq += (x * x).sum(axis=(0, 1))
        n += x.shape[0] * x.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


def pad_batch(
    frames: np.ndarray, rows: pd.DataFrame, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Standardize, then zero-pad along time: (B, n_mels, T, 3) and true lengths (B,)."""
    lengths = rows["frames"].to_numpy(np.int32)
    t = int(-(-lengths.max() // TIME_QUANTUM) * TIME_QUANTUM)
    x = np.zeros((len(rows), frames.shape[1], t, 3), np.float32)
    for b, r in enumerate(rows.itertuples()):
        u = (frames[int(r.offset) : int(r.offset) + int(r.frames)] - mean) / std
        x[b, :, : u.shape[0]] = u.transpose(1, 0, 2)
    return x, lengths


def batches(
    frames: np.ndarray, rows: pd.DataFrame, mean: np.ndarray, std: np.ndarray,
    batch_frames: int, rng: np.random.Generator | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, lengths, positions) per batch; positions index into `rows`."""
    for idx in length_batches(rows["frames"].to_numpy(), batch_frames, rng):
        x, lengths = pad_batch(frames, rows.iloc[idx], mean, std)
        yield x, lengths, idx


# --- the fit loop -----------------------------------------------------------------------


def configure(train: dict[str, Any]) -> Any:
    """Op determinism, the precision policy, and the (single-device) strategy.

    Training runs on the first GPU when there is one, else on the CPU. Data
    parallelism over several GPUs is not implemented yet.
    """
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if train["mixed_precision"] else "float32"
    )
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
    import os

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)}x GPU {details.get('device_name', gpus[0].name)}"
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


class Predictor:
    """A traced inference function over variable-length batches."""

    def __init__(self, model: Any, head: str, arcface: dict[str, Any]):
        import tensorflow as tf

        from mdser.model import class_probabilities

        n_mels = model.inputs[0].shape[1]
        spec = [tf.TensorSpec((None, n_mels, None, 3), tf.float32), tf.TensorSpec((None,), tf.int32)]

        @tf.function(input_signature=spec, reduce_retracing=True)
        def probabilities(x: Any, lengths: Any) -> Any:
            outputs = model({"features": x, "lengths": lengths}, training=False)
            return class_probabilities(head, outputs, arcface)

        self.probabilities = probabilities

    def __call__(
        self, frames: np.ndarray, rows: pd.DataFrame, mean: np.ndarray, std: np.ndarray,
        batch_frames: int,
    ) -> np.ndarray:
        out = np.zeros((len(rows), 0), np.float32)
        for x, lengths, idx in batches(frames, rows, mean, std, batch_frames):
            p = np.asarray(self.probabilities(x, lengths))
            if out.shape[1] == 0:
                out = np.zeros((len(rows), p.shape[1]), np.float32)
            out[idx] = p
        return out


class TrainingDiverged(UserError):
    """A NaN or infinite loss: names the row, fold and epoch."""

    def __init__(self, message: str, fold: int):
        super().__init__(message)
        self.fold = fold


def fit_fold(
    model_params: dict[str, Any], train: dict[str, Any], heads: dict[str, Any],
    frames: np.ndarray, members: dict[str, pd.DataFrame], labels: dict[str, np.ndarray],
    n_classes: int, fold: int, row: str = "",
) -> tuple[Any, list[dict[str, float]], dict[str, Any]]:
    """Train one fold; return the model at its best validation UA, the history and stats.

    `members` holds the fold's "train" and "val" rows only: the test speaker is
    not an argument, so it cannot influence training or checkpoint selection.
    """
    import keras
    import tensorflow as tf

    from mdser.model import build_model, per_sample_loss

    strategy = configure(train)
    keras.utils.set_random_seed(train["seed"] * 1000 + fold)
    rng = np.random.default_rng(train["seed"] * 1000 + fold)

    stats_rows = members["train"] if train["standardize"] == "train" else members["all"]
    mean, std = standardization(frames, stats_rows)
    weights = class_weights(labels["train"], n_classes, train["class_weight_alpha"]).astype(np.float32)
    steps = len(length_batches(members["train"]["frames"].to_numpy(), train["batch_frames"]))

    with strategy.scope():
        model = build_model(model_params, n_classes, n_mels=frames.shape[1])
        optimizer = keras.optimizers.Adam(_clr_schedule(steps, train["lr_min"], train["lr_max"]))
        if train["mixed_precision"]:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # else the first step is traced twice
    loss_fn = per_sample_loss(model_params["head"], heads["arcface"], heads["softmax"])
    n_mels = frames.shape[1]
    spec = [
        tf.TensorSpec((None, n_mels, None, 3), tf.float32), tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.float32),
    ]

    @tf.function(input_signature=spec, jit_compile=train["xla"], reduce_retracing=True)
    def train_step(x: Any, lengths: Any, y: Any, w: Any) -> Any:
        with tf.GradientTape() as tape:
            out = model({"features": x, "lengths": lengths}, training=True)
            loss = tf.reduce_mean(loss_fn(y, out) * w)
            scaled = optimizer.scale_loss(loss) if train["mixed_precision"] else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    predict = Predictor(model, model_params["head"], heads["arcface"])
    history: list[dict[str, float]] = []
    best_ua, best_epoch, best_weights, waited = -1.0, 0, model.get_weights(), 0
    for epoch in range(1, train["max_epochs"] + 1):
        losses = []
        for x, lengths, idx in batches(frames, members["train"], mean, std, train["batch_frames"], rng):
            y = labels["train"][idx].astype(np.int32)
            losses.append(train_step(x, lengths, y, weights[y]))  # no host sync per step
        loss = float(np.mean([float(v) for v in losses]))
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"row {row or '?'}, fold {fold}, epoch {epoch}: training loss is {loss}; "
                "lower train.lr_max or check the features",
                fold,
            )
        probs = predict(frames, members["val"], mean, std, train["batch_frames"])
        val_ua = unweighted_accuracy(labels["val"], probs.argmax(axis=1))
        lr = float(cyclical_lr(steps * epoch, steps, train["lr_min"], train["lr_max"]))
        history.append({"epoch": epoch, "train_loss": loss, "val_ua": val_ua, "lr": lr})
        if val_ua > best_ua:
            best_ua, best_epoch, best_weights, waited = val_ua, epoch, model.get_weights(), 0
        else:
            waited += 1
            if train["patience"] and waited >= train["patience"]:
                break
    model.set_weights(best_weights)
    stats = {"best_epoch": best_epoch, "val_ua": best_ua, "mean": mean.tolist(), "std": std.tolist()}
    return model, history, stats


def fit_with_smaller_batches_on_oom(
    model_params: dict[str, Any], train: dict[str, Any], *args: Any, **kwargs: Any
) -> tuple[Any, list[dict[str, float]], dict[str, Any]]:
    """`fit_fold`; on a device out-of-memory, halve `batch_frames` and retrain the fold."""
    import tensorflow as tf

    batch_frames = train["batch_frames"]
    while True:
        try:
            smaller = train | {"batch_frames": batch_frames}
            model, history, stats = fit_fold(model_params, smaller, *args, **kwargs)
            return model, history, stats | {"batch_frames": batch_frames}
        except tf.errors.ResourceExhaustedError:
            if batch_frames <= 2 * TIME_QUANTUM:
                raise UserError("out of memory even with the smallest batch; free the device") from None
            batch_frames //= 2
            print(f"out of memory: retrying the fold with train.batch_frames = {batch_frames}")


def encode_labels(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["emotion"]) - set(lookup))
    if unknown:
        raise UserError(f"emotions {unknown} are not in the class set {classes}")
    return rows["emotion"].map(lookup).to_numpy(np.int64)


def fold_key(*parts: Any) -> str:
    """A content hash of everything a fold's result depends on (for resuming)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def train_row(
    params: dict[str, Any], row: str, model_params: dict[str, Any], feature_store: Path,
    folds_doc: dict[str, Any], out: Path, resume_dir: Path,
) -> list[dict[str, Any]]:
    """Train every selected fold of one ablation row into `out`.

    Each finished fold is also kept under `resume_dir/<key>/`, keyed by a hash of
    its inputs, so an interrupted stage resumes from the last completed fold.
    """
    from mdser.stores import open_features, read_meta

    index, frames = open_features(feature_store)
    meta = read_meta(feature_store)
    if meta.get("manifest_sha256") != folds_doc["manifest_sha256"]:
        raise UserError(
            f"{feature_store} was built from a different manifest than the folds "
            f"({meta.get('manifest_sha256')} vs {folds_doc['manifest_sha256']}); run `dvc repro`"
        )
    classes, train = folds_doc["classes"], params["train"]
    folds = folds_doc["folds"]
    if train["folds"] > len(folds):
        raise UserError(f"train.folds = {train['folds']}, but the corpus has only {len(folds)} folds")
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    results = []
    for fold in folds[: train["folds"]]:
        members = fold_members(index, fold)
        key = fold_key(model_params, train, heads, meta, fold, classes)
        done = resume_dir / key
        if not (done / "fold.json").exists():
            fit_members = {"train": members["train"], "val": members["val"], "all": index}
            labels = {r: encode_labels(members[r], classes) for r in ("train", "val")}
            model, history, stats = fit_with_smaller_batches_on_oom(
                model_params, train, heads, frames, fit_members, labels, len(classes),
                fold["fold"], row,
            )
            tmp = done.with_name(key + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model.save_weights(tmp / "model.weights.h5")
            pd.DataFrame(history).to_csv(tmp / "history.csv", index=False, lineterminator="\n")
            stats |= {"fold": fold["fold"], "device": device_name()}
            (tmp / "fold.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(done, ignore_errors=True)
            tmp.rename(done)
        target = out / f"fold_{fold['fold']}"
        shutil.copytree(done, target)
        results.append(json.loads((target / "fold.json").read_text()))
    return results
