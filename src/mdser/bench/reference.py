"""The model's layers as they were when the training-speed issue was filed: the benchmark's
reference path.

The library's `MaxPool2x2`, `SpatialPyramidPooling` and `Conv2D` compute the same outputs
with fewer and cheaper ops (README, *Performance*). To measure that, the ``reference``
fold-epoch job builds its model from these earlier versions: `reference_layers` swaps them
into the model builder for as long as the model is built.

* 2x2 max pooling: one max over both window axes of a 6-d reshape;
* SPP: every (frequency bin, time bin) pair as a mask over the whole time axis, maxed;
* convolutions: Keras' own Conv2D, whose dilation goes through SpaceToBatch/BatchToSpace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
from keras import ops

from mdser.model import builder
from mdser.model.layers import MaxPool2x2, SpatialPyramidPooling, adaptive_bins


class ReferenceMaxPool2x2(MaxPool2x2):
    def call(self, x):
        n_freq, channels = x.shape[1] // 2, x.shape[3]
        n_frames = ops.shape(x)[2] // 2
        x = ops.reshape(x[:, : 2 * n_freq, : 2 * n_frames], (-1, n_freq, 2, n_frames, 2, channels))
        return ops.max(x, axis=(2, 4))


class ReferenceSpatialPyramidPooling(SpatialPyramidPooling):
    def call(self, x, lengths):
        n_freq = self.n_freq or x.shape[1]
        lengths = ops.cast(lengths, "int32")[:, None, None]  # (B, 1, 1)
        frames = ops.arange(ops.shape(x)[2], dtype="int32")[None, None, :]  # (1, 1, T)
        neg_inf = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
        levels = []
        for n in self.levels:
            by_freq = ops.stack(
                [ops.max(x[:, lo:hi], axis=1) for lo, hi in adaptive_bins(n_freq, n)], axis=1
            )  # (B, n, T, C)
            i = ops.arange(n, dtype="int32")[None, :, None]
            start, end = (i * lengths) // n, ((i + 1) * lengths + n - 1) // n
            inside = (frames >= start) & (frames < end)  # (B, n time bins, T)
            masked = ops.where(inside[:, None, :, :, None], by_freq[:, :, None], neg_inf)
            levels.append(ops.reshape(ops.max(masked, axis=3), (-1, n * n, x.shape[3])))
        return ops.concatenate(levels, axis=1)


@contextlib.contextmanager
def reference_layers() -> Iterator[None]:
    """Models built inside this block use the reference layers."""
    swapped = {"MaxPool2x2": ReferenceMaxPool2x2,
               "SpatialPyramidPooling": ReferenceSpatialPyramidPooling,
               "Conv2D": keras.layers.Conv2D}
    saved = {name: getattr(builder, name) for name in swapped}
    for name, layer in swapped.items():
        setattr(builder, name, layer)
    try:
        yield
    finally:
        for name, layer in saved.items():
            setattr(builder, name, layer)
