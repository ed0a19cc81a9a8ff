"""Length-aware layers of the multi-dilated CNN (paper Fig. 2, 4, 5; Eq. 9-11).

Every tensor is channels_last: a feature map is (batch, frequency, time, channels) and is
zero-padded along time. Each layer that looks at the time axis takes the true number of
frames per utterance, ``lengths`` (batch,), so that an utterance padded inside a batch gives
the same output as the same utterance alone:

* ``MaskFrames`` re-zeroes the padded frames. The builder applies it before every
  convolution that mixes frames (1x3, 5x3), because bias and activation turn padded zeros
  into non-zeros that a 'same' convolution along time would carry into the last real frames.
* ``PoolLengths`` carries the true length through a valid max pooling (floor(L / 2)).
* ``MaskedGlobalMaxPooling`` and ``SpatialPyramidPooling`` only look at real frames.

The classifier heads and their losses (softmax, ArcFace Eq. 12-14) are in ``heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

# The paper uses LeakyReLU without giving its slope; 0.3 is the Keras (and tf.keras) default.
LEAKY_SLOPE = 0.3


# ----------------------------------------------------------------------------- masking


def frame_mask(lengths, n_frames):
    """(batch, n_frames) boolean: True where frame t < lengths[b] (a real frame)."""
    frames = ops.arange(n_frames, dtype="int32")
    return ops.expand_dims(frames, 0) < ops.expand_dims(ops.cast(lengths, "int32"), 1)


@keras.saving.register_keras_serializable(package="mdser")
class MaskFrames(keras.layers.Layer):
    """Set every padded frame (t >= length) of a (B, F, T, C) map to zero."""

    def call(self, x, lengths):
        mask = ops.cast(frame_mask(lengths, ops.shape(x)[2]), x.dtype)
        return x * mask[:, None, :, None]

    def compute_output_shape(self, x_shape, lengths_shape=None):
        return x_shape


@keras.saving.register_keras_serializable(package="mdser")
class MaxPool2x2(keras.layers.Layer):
    """2x2 max pooling, stride 2, 'valid' padding: (B, F, T, C) -> (B, F // 2, T // 2, C).

    Written as reshape + max rather than MaxPooling2D because the gradient of TensorFlow's
    MaxPool op has no deterministic XLA implementation (it fails under op determinism with
    jit_compile); the reduce_max gradient is deterministic.
    """

    def call(self, x):
        n_freq, channels = x.shape[1] // 2, x.shape[3]
        n_frames = ops.shape(x)[2] // 2
        x = x[:, : 2 * n_freq, : 2 * n_frames]
        x = ops.reshape(x, (-1, n_freq, 2, n_frames, 2, channels))
        return ops.max(x, axis=(2, 4))

    def compute_output_shape(self, x_shape):
        frames = None if x_shape[2] is None else x_shape[2] // 2
        return (x_shape[0], x_shape[1] // 2, frames, x_shape[3])


@keras.saving.register_keras_serializable(package="mdser")
class PoolLengths(keras.layers.Layer):
    """True lengths after a 'valid' max pooling of size/stride ``pool``: floor(L / pool).

    A pooled frame is real only if its whole window lies on real frames, so a window never
    mixes a real frame with padding (the last odd frame of an utterance is dropped, exactly
    as it is when the utterance is pooled alone).
    """

    def __init__(self, pool: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.pool = pool

    def call(self, lengths):
        return ops.floor_divide(ops.cast(lengths, "int32"), self.pool)

    def compute_output_spec(self, lengths):
        return keras.KerasTensor(lengths.shape, dtype="int32")

    def get_config(self):
        return {**super().get_config(), "pool": self.pool}


# ----------------------------------------------------------------------------- pooling


def adaptive_bins(size: int, n: int) -> list[tuple[int, int]]:
    """Bin i of n over ``size`` positions covers [floor(i*size/n), ceil((i+1)*size/n)).

    This is the placement of adaptive max pooling: the bins cover every position, each bin is
    non-empty for every size >= 1, and bins overlap when size is not a multiple of n
    (in particular when size < n).
    """
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


def _masked_max_over_time(x, inside):
    """Max over the time axis (2) of x (B, F, T, C) where ``inside`` (B, T) is True."""
    neg_inf = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
    return ops.max(ops.where(inside[:, None, :, None], x, neg_inf), axis=2)


@keras.saving.register_keras_serializable(package="mdser")
class MaskedGlobalMaxPooling(keras.layers.Layer):
    """GMP: max over all frequencies and the real frames -> (B, 1, C), one 'bin' per map."""

    def call(self, x, lengths):
        inside = frame_mask(lengths, ops.shape(x)[2])
        pooled = ops.max(_masked_max_over_time(x, inside), axis=1)  # (B, C)
        return ops.expand_dims(pooled, 1)

    def compute_output_shape(self, x_shape, lengths_shape=None):
        return (x_shape[0], 1, x_shape[3])


@keras.saving.register_keras_serializable(package="mdser")
class SpatialPyramidPooling(keras.layers.Layer):
    """SPP (paper Fig. 5): for each level n, split the F x L map into n x n bins, max per bin.

    Output (B, K, C) with K = sum(n^2): for each level in order, bin (j, i) = (frequency bin
    j, time bin i) at position j * n + i. Frequency bins come from ``adaptive_bins(F, n)``
    (static); time bins from the same formula applied to each utterance's true length L, so
    padding never enters a bin and every bin is non-empty for L >= 1.
    """

    def __init__(self, levels: Sequence[int], n_freq: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.levels = [int(n) for n in levels]
        self.n_freq = n_freq  # static frequency size; dilated convs in a graph can lose it

    def call(self, x, lengths):
        n_freq = self.n_freq or x.shape[1]
        lengths = ops.cast(lengths, "int32")[:, None, None]  # (B, 1, 1)
        frames = ops.arange(ops.shape(x)[2], dtype="int32")[None, None, :]  # (1, 1, T)
        neg_inf = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
        levels = []
        for n in self.levels:
            # (B, n, T, C): max over each frequency bin, time still unpooled.
            by_freq = ops.stack(
                [ops.max(x[:, lo:hi], axis=1) for lo, hi in adaptive_bins(n_freq, n)], axis=1
            )
            i = ops.arange(n, dtype="int32")[None, :, None]  # (1, n, 1)
            start = (i * lengths) // n
            end = ((i + 1) * lengths + n - 1) // n  # ceil((i + 1) * L / n), non-negative ints only
            inside = (frames >= start) & (frames < end)  # (B, n time bins, T)
            # (B, n_freq_bins, n_time_bins, T, C) -> max over T: all time bins in one op.
            masked = ops.where(inside[:, None, :, :, None], by_freq[:, :, None], neg_inf)
            grid = ops.max(masked, axis=3)
            levels.append(ops.reshape(grid, (-1, n * n, x.shape[3])))
        return ops.concatenate(levels, axis=1)

    def compute_output_shape(self, x_shape, lengths_shape=None):
        return (x_shape[0], sum(n * n for n in self.levels), x_shape[3])

    def get_config(self):
        return {**super().get_config(), "levels": self.levels, "n_freq": self.n_freq}


# ----------------------------------------------------------------------------- attention


@keras.saving.register_keras_serializable(package="mdser")
class BinAttention(keras.layers.Layer):
    """Attention over the pooled bins (paper Eq. 9-11), returns ``[y, alpha]``.

    The pooled output is read as K bin vectors x_k in R^C (K = sum n^2 for SPP, 1 for GMP):
        v_k = sigmoid(W^T x_k + b)      in R^units            (Eq. 9)
        alpha = softmax_k(v_k . u)      u: learned context     (Eq. 10)
        y_k = K * alpha_k * x_k         shape (B, K, C)        (Eq. 11, rescaled)
    W and b are shared over the bins. The softmax is taken in float32. The factor K
    (a constant) makes uniform attention the identity: without it the FC layer would
    see its input shrunk K-fold (126x for SPP(1,5,10)), which stalls training.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, x_shape):
        channels = x_shape[-1]
        self.w = self.add_weight(shape=(channels, self.units), initializer="glorot_uniform",
                                 name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")
        self.u = self.add_weight(shape=(self.units,), initializer="glorot_uniform", name="u")

    def call(self, x):
        v = ops.sigmoid(ops.matmul(x, self.w) + self.b)  # (B, K, units)
        scores = ops.cast(ops.sum(v * self.u, axis=-1), "float32")  # (B, K)
        alpha = ops.exp(scores - ops.logsumexp(scores, axis=-1, keepdims=True))  # softmax_k
        k = ops.cast(ops.shape(x)[1], x.dtype)
        y = x * (k * ops.cast(alpha, x.dtype))[:, :, None]
        return [y, alpha]

    def compute_output_spec(self, x):
        return [
            keras.KerasTensor(x.shape, dtype=self.compute_dtype),
            keras.KerasTensor(x.shape[:2], dtype="float32"),
        ]

    def get_config(self):
        return {**super().get_config(), "units": self.units}
