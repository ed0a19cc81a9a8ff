"""Training procedure (paper section "Model training").

Class-weighted loss (Eq. 15), the triangular cyclical learning rate (Eq. 16-19), the
paper's learning-rate range test, `RowTrainer` (a row's model, optimizer and traced
steps), and the fit loop of one fold: early stopping and checkpoint selection on the
validation speaker's UA, with its state kept after every epoch. The test speaker is never
read here; `row_training` runs a row's folds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.batching import TIME_QUANTUM, Predictor, batches, length_batches
from mdser.console import progress_bar
from mdser.errors import UserError
from mdser.features import standardization, vtlp
from mdser.params import is_candidate
from mdser.runtime import configure
from mdser.statistics import unweighted_accuracy

RANGE_TEST_SAMPLE = 128  # training utterances whose UA the range test follows
# Set when the stage stops (an error in another fold, a signal): every fold stops at its next
# batch. A fold process gets the stage's event instead (`row_training.start_fold_process`).
STOP = threading.Event()


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


def range_test_lr(step: Any, sweep_steps: float, lr_start: float, lr_end: float) -> Any:
    """The range test's sweep: lr_start at step 0, growing geometrically to lr_end at `sweep_steps`."""
    import keras.ops as ops

    fraction = ops.cast(step, "float32") / ops.maximum(ops.cast(sweep_steps, "float32"), 1.0)
    return lr_start * ops.power(lr_end / lr_start, fraction)


def learning_rate_schedule() -> Any:
    """One Keras schedule for a row's optimizer, set per fold without retracing.

    With `sweep_steps` = 0 it is the CLR of Eq. 16-19 between `lr_min` and `lr_max`;
    otherwise the range test's geometric sweep from `lr_min` to `lr_max`.
    """
    import keras
    import tensorflow as tf

    class FoldLearningRate(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self) -> None:
            def variable(name: str) -> Any:
                return tf.Variable(1.0, trainable=False, name=name, dtype=tf.float32)

            self.stepsize, self.sweep_steps = variable("clr_stepsize"), variable("sweep_steps")
            self.lr_min, self.lr_max = variable("lr_min"), variable("lr_max")

        def __call__(self, step: Any) -> Any:
            clr = cyclical_lr(step, self.stepsize, self.lr_min, self.lr_max)
            sweep = range_test_lr(step, self.sweep_steps, self.lr_min, self.lr_max)
            return tf.where(self.sweep_steps > 0, sweep, clr)

        def set(self, lr_min: float, lr_max: float, stepsize: float = 1.0, sweep_steps: float = 0.0) -> None:
            for variable, value in ((self.lr_min, lr_min), (self.lr_max, lr_max),
                                    (self.stepsize, stepsize), (self.sweep_steps, sweep_steps)):
                variable.assign(float(value))

        def get_config(self) -> dict[str, Any]:
            return {}

    return FoldLearningRate()


def clr_bounds(lrs: list[float], uas: list[float]) -> tuple[float, float] | None:
    """The CLR bounds from a range test (paper, "Model training"): "the learning rate leading
    to the obvious increase of the UA and the one resulting in the decrease of the UA are
    selected as the minimal and the maximal learning rates".

    Read on the curve smoothed by a 3-point moving average (one validation speaker is
    noisy): lr_max is the learning rate at the curve's peak, after which the UA decreases;
    lr_min the first one at which the UA has made half of its rise from the first point to
    the peak (the point before the peak if that is the peak itself). None when the UA
    never rises above its first value.
    """
    ua = np.asarray(uas, np.float64)
    padded = np.concatenate([ua[:1], ua, ua[-1:]])
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    peak = int(np.argmax(smooth))
    rise = smooth[peak] - smooth[0]
    if peak == 0 or rise <= 1e-9:
        return None
    low = int(np.argmax(smooth - smooth[0] >= rise / 2))
    low = min(low, peak - 1)
    return float(lrs[low]), float(lrs[peak])


# --- the fit loop -----------------------------------------------------------------------


class RowTrainer:
    """The model, optimizer and traced train and predict functions of one ablation row.

    Built and traced once; `start_fold` re-initialises the weights (as a model built
    with the fold's seed) and the optimizer, so later folds pay no tracing. `head_params`
    is the row's head section of params.yaml, `params[model_params["head"]]`.
    """

    def __init__(
        self, model_params: dict[str, Any], train: dict[str, Any], head_params: dict[str, Any],
        n_classes: int, n_mels: int, strategy: Any = None,
    ):
        import keras
        import tensorflow as tf

        from mdser.model import build_model, per_sample_loss

        self.build = lambda: build_model(model_params, n_classes, n_mels=n_mels)
        default = configure(train)  # also sets op determinism and the precision policy
        self.strategy = strategy = strategy or default
        self.fixed_bounds = (train["lr_min"], train["lr_max"])
        self.margin_warmup = head_params["margin_warmup"] if model_params["head"] == "arcface" else 0
        with strategy.scope():
            self.schedule = learning_rate_schedule()  # set per fold
            self.model = self.build()
            optimizer = keras.optimizers.Adam(self.schedule)
            if train["mixed_precision"]:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(self.model.trainable_variables)  # else the first step is traced twice
        self.optimizer = optimizer
        self.initial_optimizer = [v.numpy() for v in optimizer.variables]
        loss_fn = per_sample_loss(model_params["head"], head_params)
        model, variables = self.model, self.model.trainable_variables

        self.margin_warmup_steps = tf.Variable(0.0, trainable=False, name="margin_warmup_steps")

        def margin_fraction() -> Any:
            """The ArcFace margin's share of m at this step: a linear ramp over the warm-up."""
            warmup = self.margin_warmup_steps
            done = tf.cast(optimizer.iterations, tf.float32) / tf.maximum(warmup, 1.0)
            return tf.where(warmup > 0, tf.minimum(done, 1.0), 1.0)

        def replica_step(x: Any, lengths: Any, y: Any, w: Any, count: Any) -> Any:
            """Weighted loss summed over this replica's utterances / the global batch size."""
            with tf.GradientTape() as tape:
                out = model({"features": x, "lengths": lengths}, training=True)
                loss = tf.reduce_sum(loss_fn(y, out, margin_fraction()) * w) / count
                scaled = optimizer.scale_loss(loss) if train["mixed_precision"] else loss
            grads = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))  # all-reduced (sum)
            return loss

        spec = [
            tf.TensorSpec((None, n_mels, None, 3), tf.float32), tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.float32),
        ]
        self.replicas = strategy.num_replicas_in_sync
        if self.replicas == 1:
            @tf.function(input_signature=spec, jit_compile=train["xla"], reduce_retracing=True)
            def train_step(x: Any, lengths: Any, y: Any, w: Any) -> Any:
                return replica_step(x, lengths, y, w, tf.cast(tf.size(y), tf.float32))

            self.train_step = train_step
            train_step.get_concrete_function()  # traced here, not at the first step
        else:
            @tf.function(jit_compile=train["xla"], reduce_retracing=True)
            def mirrored_step(x: Any, lengths: Any, y: Any, w: Any, count: Any) -> Any:
                losses = strategy.run(replica_step, args=(x, lengths, y, w, count))
                return strategy.reduce("SUM", losses, axis=None)

            self.train_step = lambda *batch: mirrored_step(*self.shard(*batch))
        self.predict = Predictor(model, model_params["head"], head_params)
        self.predict.probabilities.get_concrete_function()

    def shard(self, x: np.ndarray, lengths: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple:
        """Split a batch into one equal part per replica; the padding copies weigh 0."""
        n, size = self.replicas, -(-len(y) // self.replicas)
        pad = np.zeros(n * size - len(y), np.int64)  # copies of the first utterance
        parts = [np.concatenate([a, a[pad]]) for a in (x, lengths, y)]
        parts.append(np.concatenate([w, np.zeros(pad.size, w.dtype)]))

        def per_replica(a: np.ndarray) -> Any:
            def part(ctx: Any) -> np.ndarray:
                i = ctx.replica_id_in_sync_group
                return a[i * size : (i + 1) * size]

            return self.strategy.experimental_distribute_values_from_function(part)

        return (*map(per_replica, parts), np.float32(len(y)))

    def start_fold(self, seed: int, steps_per_epoch: int, bounds: tuple[float, float] | None = None,
                   sweep_steps: int = 0) -> None:
        """Fresh weights exactly as `build_model` after `set_random_seed(seed)`; fresh Adam state;
        the CLR between `bounds` (default: train.lr_min, lr_max) with stepsize = one epoch, or,
        with `sweep_steps`, the range test's sweep from bounds[0] to bounds[1] over that many steps."""
        import keras

        keras.utils.set_random_seed(seed)
        initial = self.build().get_weights()
        self.model.set_weights(initial)
        self.set_state({"optimizer": self.initial_optimizer})
        lr_min, lr_max = bounds or self.fixed_bounds
        self.schedule.set(lr_min, lr_max, steps_per_epoch, sweep_steps)
        self.margin_warmup_steps.assign(float(self.margin_warmup * steps_per_epoch))

    def state(self) -> dict[str, list[np.ndarray]]:
        return {"weights": self.model.get_weights(),
                "optimizer": [v.numpy() for v in self.optimizer.variables]}

    def set_state(self, state: dict[str, list[np.ndarray]]) -> None:
        if "weights" in state:
            self.model.set_weights(state["weights"])
        for variable, value in zip(self.optimizer.variables, state["optimizer"], strict=True):
            variable.assign(value)


@contextlib.contextmanager
def frozen_heap() -> Any:
    """Python's cyclic garbage collector skips every object that exists when the block
    starts. TensorFlow, Keras and a trainer's traced functions are millions of long-lived
    objects, and walking them took 4 % of a default-profile training step (`perf`, README
    *Performance*); afterwards they are collectable again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TrainingDiverged(UserError):
    """A NaN or infinite loss: names the row, fold and epoch."""

    def __init__(self, message: str, fold: int):
        super().__init__(message, fold)
        self.fold = fold

    def __str__(self) -> str:
        return str(self.args[0])


class FoldStopped(Exception):
    """The stage is stopping: this fold leaves its last completed epoch for a resume."""


def save_epoch(path: Path, progress: dict[str, Any], state: dict[str, list[np.ndarray]],
               best_weights: list[np.ndarray]) -> None:
    """Write the state after an epoch atomically (temporary name, then rename)."""
    arrays = {"progress": np.asarray(json.dumps(progress, sort_keys=True))}
    arrays |= {f"weights_{i}": w for i, w in enumerate(state["weights"])}
    arrays |= {f"optimizer_{i}": v for i, v in enumerate(state["optimizer"])}
    arrays |= {f"best_{i}": w for i, w in enumerate(best_weights)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load_epoch(path: Path) -> tuple[dict[str, Any], dict[str, list[np.ndarray]], list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        def listed(prefix: str) -> list[np.ndarray]:
            n = sum(1 for k in z.files if k.startswith(prefix))
            return [z[f"{prefix}{i}"] for i in range(n)]

        progress = json.loads(str(z["progress"]))
        return progress, {"weights": listed("weights_"), "optimizer": listed("optimizer_")}, listed("best_")


def training_batches(
    frames: np.ndarray, rows: pd.DataFrame, mean: np.ndarray, std: np.ndarray,
    train: dict[str, Any], rng: np.random.Generator, sample_rate: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`batches` in a shuffled order; with `train.vtlp`, each utterance warped along its
    bands by its own factor from [1 - vtlp, 1 + vtlp] (`features.vtlp`, drawn from `rng`)."""
    for x, lengths, idx in batches(frames, rows, mean, std, train["batch_frames"], rng):
        if train["vtlp"]:
            x = vtlp(x, rng.uniform(1 - train["vtlp"], 1 + train["vtlp"], len(x)), sample_rate)
        yield x, lengths, idx


def run_range_test(
    trainer: RowTrainer, train: dict[str, Any], frames: np.ndarray, members: dict[str, pd.DataFrame],
    labels: dict[str, np.ndarray], weights: np.ndarray, seed: int, mean: np.ndarray, std: np.ndarray,
    steps: int, sample_rate: int,
) -> list[dict[str, float]]:
    """The paper's learning-rate range test on the fold's training and validation speakers.

    `range_test.epochs` epochs whose learning rate grows geometrically from `lr_start` to
    `lr_end`; at `range_test.points` evenly spaced steps the UA is measured on a fixed
    sample of the training utterances (the training curve the bounds are read from:
    it sees hundreds of utterances where the validation speaker has a few dozen) and on
    the validation speaker (recorded for the plot). Returns one {step, lr, train_loss,
    train_ua, val_ua} per point, up to the first non-finite loss.
    """
    sweep = train["range_test"]
    total = sweep["epochs"] * steps
    marks = {max(1, round(k * total / sweep["points"])) for k in range(1, sweep["points"] + 1)}
    trainer.start_fold(seed, steps, (sweep["lr_start"], sweep["lr_end"]), sweep_steps=total)
    rng = np.random.default_rng([seed, 1])
    n_train = len(members["train"])
    sample = np.sort(rng.permutation(n_train)[:RANGE_TEST_SAMPLE])
    probe = {"train": (members["train"].iloc[sample], labels["train"][sample]),
             "val": (members["val"], labels["val"])}
    curve, step, losses = [], 0, []
    for _ in range(sweep["epochs"]):
        for x, lengths, idx in training_batches(frames, members["train"], mean, std, train, rng, sample_rate):
            if STOP.is_set():
                raise FoldStopped
            y = labels["train"][idx].astype(np.int32)
            losses.append(trainer.train_step(x, lengths, y, weights[y]))
            step += 1
            if step not in marks:
                continue
            loss = float(np.mean([float(v) for v in losses]))
            if not math.isfinite(loss):
                return curve  # diverged: the learning rates from here on are too large
            point = {"step": step, "lr": float(range_test_lr(step - 1, total, sweep["lr_start"],
                                                            sweep["lr_end"])), "train_loss": loss}
            for role, (rows, truth) in probe.items():
                probs = trainer.predict(frames, rows, mean, std, train["batch_frames"])
                point[f"{role}_ua"] = unweighted_accuracy(truth, probs.argmax(axis=1))
            curve.append(point)
            losses = []
    return curve


@frozen_heap()  # a fold trains with TensorFlow's long-lived objects frozen
def fit_fold(
    trainer: RowTrainer, train: dict[str, Any], frames: np.ndarray,
    members: dict[str, pd.DataFrame], labels: dict[str, np.ndarray], n_classes: int,
    fold: int, row: str = "", checkpoint: Path | None = None, sample_rate: int = 16000,
) -> tuple[list[np.ndarray], list[dict[str, float]], dict[str, Any]]:
    """Train one fold; return the weights at its best validation UA, the history and stats.

    `members` holds the fold's "train" and "val" rows only: the test speaker is
    not an argument, so it cannot influence training, the range test or checkpoint
    selection. With `train.lr_policy` range_test the CLR bounds come from the range
    test (`stats["range_test"]` holds its curve), else from train.lr_min/lr_max.
    The first `train.start_from_epoch` epochs are trained but never selected (as in
    Keras' EarlyStopping), nor is an epoch that does not end a CLR cycle (`is_candidate`);
    training stops after `train.patience` epochs without a better validation UA, or at
    `train.max_epochs`. With `checkpoint`, the
    state after each epoch is kept there and a later call continues from it, with the
    same result as an uninterrupted fold. `sample_rate` is the features' audio rate
    (`train.vtlp` warps frequencies).
    """
    seed = train["seed"] * 1000 + fold
    rng = np.random.default_rng(seed)
    stats_rows = members["all"] if train["standardize"] == "global" else members["train"]
    mean, std = standardization(frames, stats_rows)
    weights = class_weights(labels["train"], n_classes, train["class_weight_alpha"]).astype(np.float32)
    steps = len(length_batches(members["train"]["frames"].to_numpy(), train["batch_frames"]))

    progress: dict[str, Any] = {"epoch": 0, "history": [], "best_ua": -1.0, "best_epoch": 0, "waited": 0}
    resumed = checkpoint is not None and checkpoint.exists()
    if resumed:
        progress, state, best_weights = load_epoch(checkpoint)
        rng.bit_generator.state = progress.pop("rng")
        print(f"row {row}, fold {fold}: resuming after epoch {progress['epoch']}")
    else:
        progress["range_test"], progress["bounds"] = [], list(trainer.fixed_bounds)
        progress["lr_source"] = "fixed"
        if train["lr_policy"] == "range_test":
            curve = run_range_test(trainer, train, frames, members, labels, weights, seed, mean, std,
                                   steps, sample_rate)
            found = clr_bounds([p["lr"] for p in curve], [p["train_ua"] for p in curve])
            progress["range_test"] = curve
            if found is not None:
                progress["bounds"], progress["lr_source"] = list(found), "range_test"
            else:
                progress["lr_source"] = "fixed: the range test's UA never rose"
    trainer.start_fold(seed, steps, tuple(progress["bounds"]))
    if resumed:
        trainer.set_state(state)
    else:
        best_weights = trainer.model.get_weights()
    lr_min, lr_max = progress["bounds"]
    epochs_bar = progress_bar(f"{row} fold {fold}", train["max_epochs"], "epoch")
    epochs_bar.update(progress["epoch"])
    while progress["epoch"] < train["max_epochs"]:
        if train["patience"] and progress["waited"] >= train["patience"]:
            break
        epoch = progress["epoch"] + 1
        losses = []
        for x, lengths, idx in training_batches(frames, members["train"], mean, std, train, rng, sample_rate):
            if STOP.is_set():
                raise FoldStopped
            y = labels["train"][idx].astype(np.int32)
            losses.append(trainer.train_step(x, lengths, y, weights[y]))  # no host sync per step
        loss = float(np.mean([float(v) for v in losses]))
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"row {row or '?'}, fold {fold}, epoch {epoch}: training loss is {loss}; "
                "lower train.lr_max or check the features",
                fold,
            )
        probs = trainer.predict(frames, members["val"], mean, std, train["batch_frames"])
        val_ua = unweighted_accuracy(labels["val"], probs.argmax(axis=1))
        lr = float(cyclical_lr(steps * epoch, steps, lr_min, lr_max))
        progress["history"].append({"epoch": epoch, "train_loss": loss, "val_ua": val_ua, "lr": lr})
        progress["epoch"] = epoch
        if epoch <= train["start_from_epoch"]:
            pass  # still warming up: neither a candidate nor counted for patience
        elif is_candidate(epoch, train["select_at"]) and val_ua > progress["best_ua"]:
            progress |= {"best_ua": val_ua, "best_epoch": epoch, "waited": 0}
            best_weights = trainer.model.get_weights()
        elif progress["best_epoch"]:  # patience counts from the first candidate on
            progress["waited"] += 1
        if checkpoint is not None:
            save_epoch(checkpoint, progress | {"rng": rng.bit_generator.state}, trainer.state(),
                       best_weights)
        epochs_bar.set_postfix(val_ua=f"{val_ua:.3f}", best=f"{progress['best_ua']:.3f}", refresh=False)
        epochs_bar.update()
    epochs_bar.close()
    stats = {"best_epoch": progress["best_epoch"], "val_ua": progress["best_ua"],
             "epochs": progress["epoch"], "lr_min": lr_min, "lr_max": lr_max,
             "lr_source": progress["lr_source"], "range_test": progress["range_test"],
             "mean": mean.tolist(), "std": std.tolist()}
    return best_weights, progress["history"], stats


def fit_with_smaller_batches_on_oom(
    trainer: RowTrainer, train: dict[str, Any], *args: Any, checkpoint: Path | None = None,
    **kwargs: Any,
) -> tuple[list[np.ndarray], list[dict[str, float]], dict[str, Any]]:
    """`fit_fold`; on a device out-of-memory, halve `batch_frames` and retrain the fold."""
    import tensorflow as tf

    batch_frames = train["batch_frames"]
    while True:
        smaller = train | {"batch_frames": batch_frames}
        at = checkpoint and checkpoint.with_name(f"{checkpoint.name}-b{batch_frames}.npz")
        try:
            best, history, stats = fit_fold(trainer, smaller, *args, checkpoint=at, **kwargs)
        except tf.errors.ResourceExhaustedError:
            if at is not None:
                at.unlink(missing_ok=True)  # this budget is never resumed
            if batch_frames <= 2 * TIME_QUANTUM:
                raise UserError("out of memory even with the smallest batch; free the device") from None
            batch_frames //= 2
            print(f"out of memory: retrying the fold with train.batch_frames = {batch_frames}")
            continue
        if at is not None:
            at.unlink(missing_ok=True)  # the finished fold is kept by the caller
        return best, history, stats | {"batch_frames": batch_frames}
