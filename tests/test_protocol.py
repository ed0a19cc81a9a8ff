"""The experimental protocol, observed in what the real code does (not re-derived).

Each test here fails if one protocol bug comes back:

* the test speaker among a fold's training rows (`mdser.splits.fold_members`);
* the cyclical learning rate applied one batch early or late: the update the real
  `RowTrainer.train_step` makes at optimizer step t must be an Adam step at
  `cyclical_lr(t, stepsize, lr_min, lr_max)` (Eq. 16-19), t = 0, 1, 2, ...;
* the class weights of Eq. 15 dropped from the train-step loss: `train_step(x, lengths,
  y, w)` must return, and descend, the weighted mean sum_i w_i l_i / B, and the fit loop
  must pass it the weights of Eq. 15 for the fold's training labels;
* a test-speaker utterance reaching training or checkpoint selection: every utterance the
  trainer reads goes through `mdser.batching.pad_batch`, which is spied on while the real
  `train_row` trains a tiny row on a tiny feature store.

Everything runs in-process on a 2-filter model: a few seconds per test on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_params, trainer_config

from mdser.errors import UserError
from mdser.splits import fold_members, speaker_folds

N_MELS = 8
CLASSES = ["ang", "neu", "sad"]
# the tiny configuration's trainer sections, narrower still: a 2-filter plain CNN with GMP and a
# softmax head, one epoch with CLR bounds ten times apart
MODEL, TRAIN, HEAD_PARAMS = trainer_config(
    model={"filters": 2, "conv": "plain", "merge": "sum", "norm": "none",
           "pooling": "gmp", "spp_levels": [1, 2],
           "attention": False, "attention_units": 4, "fc_units": 4, "head": "softmax"},
    train={"folds": 1, "max_epochs": 1, "select_at": "epoch", "batch_frames": 256, "lr_policy": "fixed",
           "lr_min": 1e-3, "lr_max": 1e-2,
           "range_test": {"lr_start": 1e-5, "lr_end": 0.1, "epochs": 1, "points": 4},
           "patience": 0})
SPEAKERS = ["s1", "s2", "s3", "s4", "s5"]


# --- a tiny corpus ----------------------------------------------------------------------------


def tiny_index(seed: int = 0) -> pd.DataFrame:
    """A feature-store index: 5 speakers, 7 utterances each, classes 3:2:2 (unbalanced, so
    that the weights of Eq. 15 are not all 1), 6-40 frames."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in SPEAKERS:
        for i, emotion in enumerate(["ang"] * 3 + ["neu"] * 2 + ["sad"] * 2):
            rows.append({"utt_id": f"{s}_{i}", "speaker": s, "emotion": emotion,
                         "frames": int(rng.integers(6, 41))})
    index = pd.DataFrame(rows)
    index["offset"] = np.concatenate([[0], np.cumsum(index["frames"])[:-1]]).astype(np.int64)
    return index[["utt_id", "speaker", "emotion", "offset", "frames"]]


def write_store(store: Path, index: pd.DataFrame, seed: int = 0) -> str:
    """A feature store in the format `mdser.stores.open_features` reads; returns the
    manifest hash recorded in it (the folds document must carry the same)."""
    rng = np.random.default_rng(seed)
    store.mkdir(parents=True)
    frames = rng.standard_normal((int(index["frames"].sum()), N_MELS, 3)).astype(np.float32)
    for r in index.itertuples():  # a class-dependent offset: something to learn
        frames[r.offset : r.offset + r.frames] += CLASSES.index(r.emotion)
    np.save(store / "features.npy", frames)
    index.to_csv(store / "index.csv", index=False, lineterminator="\n")
    manifest_sha256 = "0" * 64
    meta = {"sample_rate": 16000, "manifest_sha256": manifest_sha256,
            "index_sha256": hashlib.sha256((store / "index.csv").read_bytes()).hexdigest(),
            "features": {"n_mels": N_MELS}}
    (store / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return manifest_sha256


def manifest_of(index: pd.DataFrame, sessions: dict[str, str] | None = None) -> pd.DataFrame:
    m = index[["speaker"]].copy()
    m["session"] = m["speaker"].map(sessions or {}).fillna("")
    m["status"] = "kept"
    return m


# --- (a) fold members: the test speaker is in no fold's training or validation rows --------


@pytest.mark.parametrize("sessions", [None, {"s1": "A", "s2": "A", "s3": "B", "s4": "B",
                                             "s5": "C", "s6": "C"}], ids=["emodb", "sessions"])
def test_fold_members_hold_exactly_the_speakers_of_their_role(sessions):
    index = tiny_index()
    if sessions:  # a sixth speaker: sessions of two
        extra = tiny_index(1).assign(speaker="s6", utt_id=lambda d: "s6_" + d["utt_id"])
        index = pd.concat([index, extra.iloc[:7]], ignore_index=True)
    folds = speaker_folds(manifest_of(index, sessions))
    assert len(folds) == index["speaker"].nunique()
    for fold in folds:
        members = fold_members(index, fold)
        speakers = {role: set(rows["speaker"]) for role, rows in members.items()}
        assert speakers["test"] == {fold["test"]}
        assert speakers["val"] == {fold["val"]}
        assert speakers["train"] == set(fold["train"])
        assert fold["test"] not in speakers["train"] | speakers["val"]
        for role, rows in members.items():  # every utterance of the role's speakers, once
            who = fold["train"] if role == "train" else [fold[role]]
            assert sorted(rows["utt_id"]) == sorted(index.loc[index["speaker"].isin(who), "utt_id"])


# --- the real trainer on one batch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer():
    from mdser.training import RowTrainer

    return RowTrainer(MODEL, TRAIN, HEAD_PARAMS, len(CLASSES), N_MELS)


def one_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, N_MELS, 32, 3)).astype(np.float32)
    lengths = np.array([32, 20, 16, 9], np.int32)
    for b, n in enumerate(lengths):
        x[b, :, n:] = 0.0  # zero-padded, as pad_batch makes them
    return x, lengths, np.array([0, 1, 2, 0], np.int32)


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def per_utterance_loss_and_gradients(trainer, x, lengths, y, w):
    """The per-utterance losses l_i and the gradient of sum_i w_i l_i / B, computed here
    with the row's loss function, outside the trainer's traced step."""
    import tensorflow as tf

    from mdser.model import per_sample_loss

    loss_fn = per_sample_loss(MODEL["head"], HEAD_PARAMS)
    variables = trainer.model.trainable_variables
    with tf.GradientTape() as tape:
        out = trainer.model({"features": x, "lengths": lengths}, training=True)
        per = loss_fn(y, out)
        loss = tf.reduce_sum(per * w) / len(y)
    grads = tape.gradient(loss, variables)
    return np.asarray(per, np.float64), [np.asarray(g, np.float64) for g in grads]


class ManualAdam:
    """Adam's moments kept here, from gradients computed here; `direction(t)` is the update
    of step t (0-based) per unit learning rate, as Keras applies it."""

    def __init__(self, trainer):
        opt = trainer.optimizer
        self.b1, self.b2 = float(opt.beta_1), float(opt.beta_2)
        self.eps = float(opt.epsilon)
        self.m = self.v = None

    def direction(self, t: int, grads: list[np.ndarray]) -> np.ndarray:
        g = flat(grads)
        if self.m is None:
            self.m, self.v = np.zeros_like(g), np.zeros_like(g)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        correction = np.sqrt(1 - self.b2 ** (t + 1)) / (1 - self.b1 ** (t + 1))
        return correction * self.m / (np.sqrt(self.v) + self.eps)


def applied_step(trainer, x, lengths, y, w) -> tuple[float, np.ndarray]:
    """One real train step: its returned loss and the update it made (before - after)."""
    before = flat(v.numpy() for v in trainer.model.trainable_variables)
    loss = float(trainer.train_step(x, lengths, y, w))
    after = flat(v.numpy() for v in trainer.model.trainable_variables)
    return loss, before - after


# --- (b) the cyclical learning rate at step t is applied at step t --------------------------------


def test_the_learning_rate_applied_at_each_step_is_the_clr_of_that_step(trainer):
    from mdser.training import cyclical_lr

    stepsize = 3
    trainer.start_fold(0, stepsize)
    assert int(trainer.optimizer.iterations.numpy()) == 0  # a fold starts at step 0
    x, lengths, y = one_batch()
    w = np.ones(len(y), np.float32)
    adam = ManualAdam(trainer)
    applied, expected = [], []
    for t in range(2 * stepsize + 3):  # up to the peak, down to lr_min, up again
        _, grads = per_utterance_loss_and_gradients(trainer, x, lengths, y, w)
        direction = adam.direction(t, grads)
        _, update = applied_step(trainer, x, lengths, y, w)
        lr = float(update @ direction / (direction @ direction))  # the LR this update used
        # the update is an Adam step in that direction (nothing else moved the weights)
        assert np.abs(update - lr * direction).max() <= 1e-3 * lr, t
        applied.append(lr)
        expected.append(float(cyclical_lr(t, stepsize, TRAIN["lr_min"], TRAIN["lr_max"])))
    # a schedule one batch late (t - 1) or early (t + 1) differs by >= 30 % at every step
    np.testing.assert_allclose(applied, expected, rtol=1e-3)
    assert expected[0] == pytest.approx(TRAIN["lr_min"]) and expected[3] == pytest.approx(TRAIN["lr_max"])


# --- (c) the class weights of Eq. 15 are in the train-step loss ----------------------------------


def test_the_train_step_returns_and_descends_the_weighted_mean_loss(trainer):
    from mdser.training import cyclical_lr

    trainer.start_fold(0, 3)
    x, lengths, y = one_batch()
    w = np.array([4.0, 0.05, 1.5, 0.2], np.float32)
    per, weighted = per_utterance_loss_and_gradients(trainer, x, lengths, y, w)
    _, unweighted = per_utterance_loss_and_gradients(trainer, x, lengths, y, np.ones(4, np.float32))
    loss, update = applied_step(trainer, x, lengths, y, w)

    assert loss == pytest.approx(float(per @ w) / len(y), rel=1e-5)  # sum_i w_i l_i / B
    assert abs(float(per @ w) / len(y) - per.mean()) > 0.1 * per.mean()  # not the plain mean
    lr0 = float(cyclical_lr(0, 3, TRAIN["lr_min"], TRAIN["lr_max"]))
    with_w = lr0 * ManualAdam(trainer).direction(0, weighted)
    without_w = lr0 * ManualAdam(trainer).direction(0, unweighted)
    assert np.abs(update - with_w).max() <= 1e-3 * lr0  # the update descends the weighted loss
    assert np.abs(update - without_w).max() > 0.5 * lr0  # and is not the unweighted one's


# --- training as the stage runs it: what `train_row` reads and weighs -------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    index = tiny_index()
    path = tmp_path_factory.mktemp("features") / "features"
    manifest_sha256 = write_store(path, index)
    folds = speaker_folds(manifest_of(index))
    return {"path": path, "index": index, "folds": folds, "manifest_sha256": manifest_sha256}


def row_params(train: dict) -> dict:
    """The tiny configuration (validated) with this module's model, `train` (a whole section)
    and one worker: folds trained in this process, where the spies are."""
    return tiny_params({"model": MODEL, "train": train, "runtime": {"workers": 1}}, validate=True)


def spied_train_row(store: dict, fold: dict, train: dict, tmp: Path) -> dict:
    """Run the real train_row on one fold; return the utterances of every pad_batch call
    while training and selecting (`batches`) and while scoring the test speaker once the
    fold's model is chosen (`scored`), and the (labels, weights) of every train step."""
    from mdser import batching, row_training

    batches, scored, steps = [], [], []
    phase = {"batches": batches}
    real_pad_batch, real_trainer = batching.pad_batch, row_training.RowTrainer
    real_score = row_training.score_test_speaker

    def pad_batch_spy(frames, rows, mean, std):
        phase["batches"].append(list(rows["utt_id"]))
        return real_pad_batch(frames, rows, mean, std)

    def score_spy(*args, **kwargs):
        phase["batches"] = scored
        try:
            return real_score(*args, **kwargs)
        finally:
            phase["batches"] = batches

    class StepSpy(real_trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            step = self.train_step

            def train_step(x, lengths, y, w):
                steps.append((np.array(y), np.array(w)))
                return step(x, lengths, y, w)

            self.train_step = train_step

    folds_doc = {"manifest_sha256": store["manifest_sha256"], "classes": CLASSES, "folds": [fold]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batching, "pad_batch", pad_batch_spy)
        mp.setattr(row_training, "RowTrainer", StepSpy)
        mp.setattr(row_training, "score_test_speaker", score_spy)
        results = row_training.train_row(row_params(train), "tiny", dict(MODEL), store["path"],
                                     folds_doc, tmp / "out", tmp / "resume")
    assert [r["fold"] for r in results] == [fold["fold"]]
    return {"batches": batches, "scored": scored, "steps": steps}


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """train_row on fold k with learning-rate policy p, each run once: trained(k, p)."""
    runs = {}

    def get(k: int, policy: str) -> dict:
        if (k, policy) not in runs:
            tmp = tmp_path_factory.mktemp(f"fold{k}-{policy}")
            runs[k, policy] = spied_train_row(store, store["folds"][k],
                                              TRAIN | {"lr_policy": policy}, tmp)
        return runs[k, policy]

    return get


@pytest.mark.parametrize("policy", ["fixed", "range_test"])
@pytest.mark.parametrize("k", [0, 3])  # test s1 (val s2), test s4 (val s5)
def test_training_and_selection_never_read_a_test_speaker_utterance(trained, store, k, policy):
    fold = store["folds"][k]
    seen = trained(k, policy)
    read = {u for batch in seen["batches"] for u in batch}
    index = store["index"].set_index("utt_id")
    speakers_read = set(index.loc[sorted(read), "speaker"])
    assert fold["test"] not in speakers_read, f"fold {k}: the test speaker {fold['test']} was read"
    utts = {role: set(index.index[index["speaker"].isin(fold[role] if role == "train"
                                                         else [fold[role]])])
            for role in ("train", "val")}
    assert utts["train"] <= read  # every training utterance was trained on
    assert utts["val"] <= read  # and the validation speaker was read (checkpoint selection)
    assert read <= utts["train"] | utts["val"]
    # what `evaluate` reports: the chosen model on exactly the test speaker's utterances
    scored = {u for batch in seen["scored"] for u in batch}
    assert scored == set(index.index[index["speaker"] == fold["test"]])


def test_the_fit_loop_weighs_each_utterance_by_eq15(trained, store):
    from mdser.training import class_weights

    fold = store["folds"][0]
    seen = trained(0, "fixed")
    train_rows = store["index"][store["index"]["speaker"].isin(fold["train"])]
    labels = train_rows["emotion"].map(CLASSES.index).to_numpy()
    r = class_weights(labels, len(CLASSES), "auto")  # Eq. 15: r_c = N / (C N_c)
    assert len(set(np.round(r, 6))) > 1  # unbalanced classes: the weights differ
    assert seen["steps"]
    for y, w in seen["steps"]:
        np.testing.assert_allclose(w, r[y], rtol=1e-6)
    trained_labels = np.concatenate([y for y, _ in seen["steps"]])
    assert np.bincount(trained_labels, minlength=3).tolist() == np.bincount(labels, minlength=3).tolist()


def train_tiny_row(workers: int, store: dict, out: Path, resume: Path) -> None:
    """`train_row` of the tiny row on the store's first 2 folds with `runtime.workers`."""
    from mdser.row_training import train_row

    folds_doc = {"manifest_sha256": store["manifest_sha256"], "classes": CLASSES,
                 "folds": store["folds"][:2]}
    params = tiny_params({"model": MODEL, "train": TRAIN | {"folds": 2, "max_epochs": 4},
                          "runtime": {"workers": workers}}, validate=True)
    train_row(params, "tiny", dict(MODEL), store["path"], folds_doc, out, resume)


def test_folds_trained_in_processes_equal_folds_trained_one_after_another(store, tmp_path):
    """`runtime.workers` changes how many folds train at once, never a result: every file of
    every fold (weights, history, range test, test scores, fold record) is byte-identical.
    One worker trains in the stage's own process, so that run gets a fresh interpreter as a
    stage would (this one's TensorFlow may already be set up by other tests)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    outs = {}
    for workers in (1, 2):
        out, resume = tmp_path / f"workers{workers}", tmp_path / f"resume{workers}"
        if workers == 1:
            with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as stage:
                stage.submit(train_tiny_row, workers, store, out, resume).result()
        else:  # the fold processes never start TensorFlow in this process
            train_tiny_row(workers, store, out, resume)
        outs[workers] = {p.relative_to(out).as_posix(): p.read_bytes()
                         for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(outs[1]) == 10  # 2 folds x 5 files
    assert outs[1].keys() == outs[2].keys()
    differ = [name for name in outs[1] if outs[1][name] != outs[2][name]]
    assert not differ, differ


def fold_job(kind: str, fold: int) -> None:
    """A fold process's work in the test below: succeed, fail with a user error, or die."""
    if kind == "error":
        raise UserError(f"fold {fold} failed")
    if kind == "killed":
        os._exit(9)


def test_fold_processes_raise_what_a_sequential_run_would_and_name_a_dead_process():
    """The error of the first failed fold in fold order (whichever failed first), after
    the folds before it are counted; a fold process that dies is a one-line UserError."""
    from mdser.row_training import train_in_processes

    done = []
    jobs = [("ok", 0), ("error", 1), ("error", 2), ("ok", 3)]
    with pytest.raises(UserError, match="^fold 1 failed$"):
        train_in_processes(fold_job, jobs, 2, lambda: done.append(1))
    assert done == [1]
    with pytest.raises(UserError, match="a fold process ended abruptly"):
        train_in_processes(fold_job, [("killed", 0), ("ok", 1)], 2, lambda: None)
