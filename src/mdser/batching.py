"""Variable-length batches and inference over them (paper: utterances of any length).

Utterances are grouped by length so that batch size x padded length stays within a
frame budget (`length_batches`), standardised and zero-padded to a multiple of
`TIME_QUANTUM` frames (`pad_batch`, few distinct shapes to trace), and the true lengths
travel with each batch so that the model masks the padding. `Predictor` is one traced
inference function over such batches, shared by training, evaluation and `mdser predict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

TIME_QUANTUM = 16  # pad batches to a multiple of this many frames: few distinct shapes


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


class Predictor:
    """A traced inference function over variable-length batches."""

    def __init__(self, model: Any, head: str, head_params: dict[str, Any]):
        import tensorflow as tf

        from mdser.model import class_probabilities

        n_mels = model.inputs[0].shape[1]
        spec = [tf.TensorSpec((None, n_mels, None, 3), tf.float32), tf.TensorSpec((None,), tf.int32)]

        @tf.function(input_signature=spec, reduce_retracing=True)
        def probabilities(x: Any, lengths: Any) -> Any:
            outputs = model({"features": x, "lengths": lengths}, training=False)
            return class_probabilities(head, outputs, head_params)

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
