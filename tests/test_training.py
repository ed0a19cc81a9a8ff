"""Training procedure pieces (Eq. 15-19, batching) against plain numpy."""

import gc

import numpy as np
import pandas as pd
import pytest
from helpers import fit, same, tiny_fold, trainer_config

from mdser.batching import TIME_QUANTUM, length_batches, pad_batch
from mdser.errors import UserError
from mdser.features import standardization
from mdser.training import class_weights, cyclical_lr, frozen_heap


def test_class_weights_eq15():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(labels, 3, alpha=0.5)
    np.testing.assert_allclose(w, [0.5 * 100 / 60, 0.5 * 100 / 30, 0.5 * 100 / 10])
    auto = class_weights(labels, 3)
    # alpha = 1 / C: every class carries the same total weight N / C
    np.testing.assert_allclose(auto * np.bincount(labels), [100 / 3] * 3)


def test_class_weights_refuse_a_missing_class():
    with pytest.raises(UserError, match=r"\[2\]"):
        class_weights(np.array([0, 1, 1]), 3)


def numpy_clr(t: int, stepsize: int, lo: float, hi: float) -> float:
    cycle = np.floor(1 + t / (2 * stepsize))
    x = abs(t / stepsize - 2 * cycle + 1)
    return lo + (hi - lo) * max(0.0, 1 - x)


def test_cyclical_lr_two_full_cycles():
    stepsize, lo, hi = 5, 1e-4, 1e-2
    steps = np.arange(0, 4 * stepsize + 1)
    ours = np.asarray(cyclical_lr(steps, stepsize, lo, hi))
    ref = [numpy_clr(int(t), stepsize, lo, hi) for t in steps]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    # triangular: lr_min at 0, 2s, 4s; lr_max at s and 3s
    np.testing.assert_allclose(ours[[0, 10, 20]], lo, rtol=1e-5)
    np.testing.assert_allclose(ours[[5, 15]], hi, rtol=1e-5)


def test_range_test_sweep_is_geometric_from_start_to_end():
    from mdser.training import range_test_lr

    steps = np.arange(0, 11)
    ours = np.asarray(range_test_lr(steps, 10, 1e-5, 1e-1))
    np.testing.assert_allclose(ours, 1e-5 * 10.0 ** (4 * steps / 10), rtol=1e-5)


def reference_bounds(lrs, uas):
    """The rule of `clr_bounds`, written out point by point."""
    n = len(uas)
    smooth = []
    for i in range(n):
        window = [uas[max(i - 1, 0)], uas[i], uas[min(i + 1, n - 1)]]
        smooth.append(sum(window) / 3)
    peak = max(range(n), key=lambda i: (smooth[i], -i))
    if peak == 0 or smooth[peak] - smooth[0] <= 1e-9:
        return None
    half = smooth[0] + (smooth[peak] - smooth[0]) / 2
    low = next(i for i in range(n) if smooth[i] >= half)
    return lrs[min(low, peak - 1)], lrs[peak]


@pytest.mark.parametrize("uas", [
    [0.14, 0.15, 0.20, 0.35, 0.50, 0.55, 0.40, 0.14],   # rise, peak, fall
    [0.30, 0.28, 0.25, 0.20, 0.14, 0.14, 0.14, 0.14],   # never rises: no bounds
    [0.14, 0.14, 0.60, 0.20, 0.60, 0.61, 0.62, 0.10],   # a noisy spike is smoothed away
    [0.14, 0.16, 0.18, 0.20, 0.22, 0.24, 0.26, 0.28],   # still rising at lr_end
])
def test_clr_bounds_follow_the_papers_rule(uas):
    from mdser.training import clr_bounds

    lrs = list(np.geomspace(1e-5, 1e-1, len(uas)))
    assert clr_bounds(lrs, uas) == reference_bounds(lrs, uas)
    found = clr_bounds(lrs, uas)
    if found is not None:
        assert found[0] < found[1]


def test_length_batches_cover_everything_once_within_the_frame_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 3000, 300)
    budget = 8000
    for shuffle in (None, np.random.default_rng(1)):
        batches = length_batches(lengths, budget, shuffle)
        flat = np.concatenate(batches)
        assert sorted(flat) == list(range(300))
        for b in batches:
            padded = -(-lengths[b].max() // TIME_QUANTUM) * TIME_QUANTUM
            assert len(b) == 1 or padded * len(b) <= budget


def test_length_batches_are_reproducible_for_a_seed():
    lengths = np.arange(100, 400)
    a = length_batches(lengths, 3000, np.random.default_rng(7))
    b = length_batches(lengths, 3000, np.random.default_rng(7))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_standardization_and_padding():
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((30, 4, 3)).astype(np.float32) * 3 + 1
    rows = pd.DataFrame({"offset": [0, 10], "frames": [10, 20]})
    mean, std = standardization(frames, rows)
    np.testing.assert_allclose(mean, frames.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, frames.reshape(-1, 3).std(0), rtol=1e-5)
    x, lengths = pad_batch(frames, rows, mean, std)
    assert x.shape == (2, 4, 32, 3) and list(lengths) == [10, 20]
    np.testing.assert_allclose(x[0, :, :10], ((frames[:10] - mean) / std).transpose(1, 0, 2), rtol=1e-5)
    assert (x[0, :, 10:] == 0).all()


# --- the fit loop: one trace per row, resume after any epoch ------------------------------

# the tiny configuration's trainer sections with the full model of the paper (MDCB, SPP,
# attention, ArcFace), three epochs on helpers.tiny_fold
TINY_MODEL, TINY_TRAIN, HEAD_PARAMS = trainer_config(
    model={"conv": "mdcb", "merge": "sum", "norm": "none", "pooling": "spp", "spp_levels": [1, 2],
           "attention": True,
           "head": "arcface"},
    train={"max_epochs": 3, "batch_frames": 256, "lr_policy": "fixed", "lr_min": 1e-4, "lr_max": 5e-3,
           "range_test": {"lr_start": 1e-4, "lr_end": 1e-1, "epochs": 2, "points": 6},
           "patience": 0})


@pytest.mark.slow
def test_a_reused_trainer_gives_what_a_fresh_one_gives():
    """Folds after the first reuse the traced step; re-initialisation makes that invisible."""
    from mdser.training import RowTrainer

    shared = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    fit(shared, TINY_TRAIN, fold=0)
    traced = shared.train_step.experimental_get_tracing_count()
    best, history, _ = fit(shared, TINY_TRAIN, fold=1)
    assert shared.train_step.experimental_get_tracing_count() == traced  # no retrace
    fresh_best, fresh_history, _ = fit(RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8),
                                       TINY_TRAIN, fold=1)
    assert same(best, fresh_best) and history == fresh_history


def test_vtlp_warps_every_training_batch_and_nothing_else(monkeypatch):
    """With train.vtlp, each batch the step trains on is `vtlp` of the padded batch, with
    one factor per utterance from [1 - vtlp, 1 + vtlp]; with 0 no batch is warped."""
    import mdser.training
    from mdser.training import RowTrainer

    calls, stepped = [], []
    real_vtlp = mdser.training.vtlp

    def spy_vtlp(x, alphas, sample_rate):
        calls.append((x.copy(), alphas.copy(), sample_rate))
        return real_vtlp(x, alphas, sample_rate)

    monkeypatch.setattr(mdser.training, "vtlp", spy_vtlp)
    trainer = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, *a: stepped.append(x) or real_step(x, *a))
    fit(trainer, TINY_TRAIN | {"max_epochs": 1}, 0)
    assert stepped and not calls
    stepped.clear()
    fit(trainer, TINY_TRAIN | {"max_epochs": 1, "vtlp": 0.1}, 0)
    assert len(calls) == len(stepped)
    for (x, alphas, sample_rate), warped in zip(calls, stepped, strict=True):
        assert len(alphas) == len(x) and np.all(np.abs(alphas - 1) <= 0.1) and np.any(alphas != 1)
        np.testing.assert_array_equal(warped, real_vtlp(x, alphas, sample_rate))


@pytest.mark.slow
def test_a_fold_resumed_after_an_epoch_ends_as_an_uninterrupted_one(tmp_path):
    from mdser.training import RowTrainer

    trainer = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    whole_best, whole_history, whole_stats = fit(trainer, TINY_TRAIN, fold=0)
    checkpoint = tmp_path / "fold0.epoch.npz"
    fit(trainer, TINY_TRAIN | {"max_epochs": 1}, 0, checkpoint)  # "killed" after epoch 1
    assert checkpoint.exists() and not list(tmp_path.glob("*.tmp"))
    fresh = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)  # a new process
    best, history, stats = fit(fresh, TINY_TRAIN, 0, checkpoint)
    assert same(best, whole_best)
    assert history == whole_history and stats == whole_stats


@pytest.mark.slow
def test_no_epoch_up_to_start_from_epoch_is_selected_or_counted_for_patience():
    from mdser.training import RowTrainer

    trainer = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    train = TINY_TRAIN | {"max_epochs": 4, "start_from_epoch": 3, "patience": 1, "select_at": "epoch"}
    best, history, stats = fit(trainer, train, 0)
    assert len(history) == 4 and stats["best_epoch"] == 4  # the one epoch after the start
    assert same(best, trainer.model.get_weights())
    _, history, stats = fit(trainer, train | {"max_epochs": 8, "start_from_epoch": 2}, 0)
    assert stats["best_epoch"] >= 3 and len(history) >= 4  # patience counts from epoch 3


@pytest.mark.slow
def test_with_select_at_cycle_end_only_an_epoch_ending_at_lr_min_is_selected():
    from mdser.training import RowTrainer

    trainer = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    train = TINY_TRAIN | {"max_epochs": 9, "start_from_epoch": 2, "patience": 0, "select_at": "cycle_end"}
    _, history, stats = fit(trainer, train, 0)
    even = [h for h in history if h["epoch"] % 2 == 0 and h["epoch"] > 2]
    assert stats["best_epoch"] in [h["epoch"] for h in even]
    assert stats["val_ua"] == max(h["val_ua"] for h in even)  # the best of the candidates only
    for h in history:  # an even epoch ends where the CLR is at lr_min (stepsize one epoch)
        assert (h["lr"] == pytest.approx(train["lr_min"])) == (h["epoch"] % 2 == 0)


MIRRORED = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from helpers import fit
from mdser.training import RowTrainer
TINY_MODEL, TINY_TRAIN, HEAD_PARAMS = json.loads(sys.argv[2])
single = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
mirrored = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8,
                      tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
(b1, h1, _), (b2, h2, _) = fit(single, TINY_TRAIN, 0), fit(mirrored, TINY_TRAIN, 0)
diff = max(float(np.abs(a - b).max()) for a, b in zip(b1, b2, strict=True))
print(json.dumps({"replicas": mirrored.replicas, "single": h1, "mirrored": h2, "diff": diff}))
"""


@pytest.mark.slow
def test_mirrored_strategy_over_two_devices_trains_as_one_device():
    """The multi-GPU path (tf.distribute.MirroredStrategy), here over two logical CPUs:
    batches split per replica (odd sizes padded with zero-weight copies), gradients summed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    config = json.dumps([TINY_MODEL, TINY_TRAIN, HEAD_PARAMS])
    out = subprocess.run([sys.executable, "-c", MIRRORED, str(Path(__file__).parent), config],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["replicas"] == 2
    assert [h["val_ua"] for h in res["mirrored"]] == [h["val_ua"] for h in res["single"]]
    for a, b in zip(res["mirrored"], res["single"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert res["diff"] < 1e-5  # only the order of the gradient sums differs


@pytest.mark.slow
def test_a_device_out_of_memory_halves_the_batch_and_retrains_the_fold(tmp_path, capsys):
    """The GPU's ResourceExhaustedError, injected into the real step for batches above a budget."""
    import tensorflow as tf

    from mdser.training import RowTrainer, fit_with_smaller_batches_on_oom

    trainer = RowTrainer(TINY_MODEL, TINY_TRAIN, HEAD_PARAMS, 3, 8)
    step = trainer.train_step

    frozen = []

    def small_memory_step(x, lengths, y, w):
        frozen.append(gc.get_freeze_count())
        if x.shape[0] * x.shape[2] > 128:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return step(x, lengths, y, w)

    trainer.train_step = small_memory_step
    frames, members, labels = tiny_fold()
    best, history, stats = fit_with_smaller_batches_on_oom(
        trainer, TINY_TRAIN | {"batch_frames": 512}, frames, members, labels, 3, 0, "tiny",
        checkpoint=tmp_path / "fold0.epoch")
    assert stats["batch_frames"] == 128 and len(history) == TINY_TRAIN["max_epochs"]
    assert "retrying the fold with train.batch_frames = 256" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # no checkpoint is left behind
    assert min(frozen) > 0 and gc.get_freeze_count() == 0  # every step ran in `frozen_heap`
    trainer.train_step = step
    alone = fit(trainer, TINY_TRAIN | {"batch_frames": 128}, 0)
    assert same(best, alone[0]) and history == alone[1]  # as if run with that budget from the start


def test_frozen_heap_freezes_what_exists_and_unfreezes_even_after_an_error():
    with pytest.raises(RuntimeError), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError
    assert gc.get_freeze_count() == 0
