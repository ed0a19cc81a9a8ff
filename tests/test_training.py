"""Training procedure pieces (Eq. 15-19, batching) against plain numpy."""

import numpy as np
import pandas as pd
import pytest

from mdser.errors import UserError
from mdser.training import (
    TIME_QUANTUM,
    class_weights,
    cyclical_lr,
    length_batches,
    pad_batch,
    standardization,
)


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
