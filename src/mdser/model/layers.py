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

import functools
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

# The paper uses LeakyReLU without giving its slope; 0.3 is the Keras (and tf.keras) default.
LEAKY_SLOPE = 0.3


# ----------------------------------------------------------------------------- convolution


@functools.cache
def native_dilated_gradient() -> bool:
    """Whether this machine's default device has a dilated-convolution gradient kernel:
    cuDNN on a GPU and oneDNN on a CPU do (TensorFlow turns oneDNN on for CPUs with
    AVX-512 VNNI, BF16 or AMX); TensorFlow's own CPU kernels do not ("Current CPU
    implementations do not yet support dilation rates larger than 1"). Probed once on a
    tiny convolution, outside any trace."""
    import tensorflow as tf

    with tf.init_scope():
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[1, 1, 8, 1], filter=tf.ones((1, 3, 1, 1)), out_backprop=tf.ones((1, 1, 8, 1)),
                strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 1, 2, 1]).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
    return True


@keras.saving.register_keras_serializable(package="mdser")
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D whose dilation runs inside the convolution kernel where the
    machine has one for its gradient (``native_dilated_gradient``: oneDNN on a CPU, cuDNN
    on a GPU). ``tf.nn.convolution``, which Keras calls, wraps every dilated convolution off
    a TPU in SpaceToBatch/BatchToSpace copies, which cost a dilated FF branch 1.2-1.4x its
    time on a CPU (README, *Performance*); elsewhere that path stays. Same weights and
    outputs up to float rounding.

    The bias is added as a broadcast addition, whose gradient is a sum over the map, rather
    than Keras' BiasAdd: TensorFlow fuses BiasAdd's gradient into oneDNN's backward-weights
    convolution, whose bias reduction took 5 % of a default-profile step (`perf`)."""

    def call(self, inputs):
        import tensorflow as tf

        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            outputs = tf.add(outputs, tf.cast(self.bias, outputs.dtype))
        return outputs if self.activation is None else self.activation(outputs)

    def convolution_op(self, inputs, kernel):
        import tensorflow as tf

        if max(self.dilation_rate) == 1 or not native_dilated_gradient():
            return super().convolution_op(inputs, kernel)
        return tf.nn.conv2d(inputs, kernel, strides=list(self.strides),
                            padding=self.padding.upper(), dilations=list(self.dilation_rate))


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

    Written as two reshaped maxima (frequency pairs, then time pairs) rather than
    MaxPooling2D because the gradient of TensorFlow's MaxPool op has no deterministic XLA
    implementation (it fails under op determinism with jit_compile); the reduce_max
    gradient is deterministic. Two one-axis maxima train 3x faster on a CPU than one
    max over both window axes of a 6-d tensor (README, *Performance*).
    """

    def call(self, x):
        n_freq, channels = x.shape[1] // 2, x.shape[3]
        n_frames = ops.shape(x)[2] // 2
        x = x[:, : 2 * n_freq, : 2 * n_frames]
        x = ops.max(ops.reshape(x, (-1, n_freq, 2, n_frames * 2 * channels)), axis=2)
        return ops.max(ops.reshape(x, (-1, n_freq, n_frames, 2, channels)), axis=3)

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


@keras.saving.register_keras_serializable(package="mdser")
class MaskedBatchNorm(keras.layers.Layer):
    """Batch normalisation of a (B, F, T, C) map over its real frames only (Ioffe & Szegedy
    2015; the paper names no normalisation, README *Choices*).

    Training: per channel, the mean and variance over the batch, the frequencies and each
    utterance's first ``lengths[b]`` frames, so padding never moves the statistics and an
    utterance's batch-mates are the only thing that does; y = gamma (x - mean) /
    sqrt(var + eps) + beta, and the moving averages follow (Keras' momentum 0.99).
    Inference: the moving averages, a fixed per-channel affine map, so a padded
    utterance gives exactly its output alone. Padded positions come out as some affine
    value; the builder re-zeroes them where the next layer would read them.
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def build(self, x_shape, lengths_shape=None):
        channels = (x_shape[-1],)
        def weight(name: str, initializer: str, trainable: bool = True):  # float32, as Keras' BN
            return self.add_weight(shape=channels, initializer=initializer, name=name,
                                   trainable=trainable, autocast=False)

        self.gamma, self.beta = weight("gamma", "ones"), weight("beta", "zeros")
        self.moving_mean = weight("moving_mean", "zeros", trainable=False)
        self.moving_variance = weight("moving_variance", "ones", trainable=False)

    def call(self, x, lengths, training=False):
        if training:
            x32 = ops.cast(x, "float32")
            real = ops.cast(frame_mask(lengths, ops.shape(x)[2]), "float32")[:, None, :, None]
            count = ops.maximum(ops.sum(real) * ops.cast(ops.shape(x)[1], "float32"), 1.0)
            mean = ops.sum(x32 * real, axis=(0, 1, 2)) / count
            variance = ops.sum(ops.square((x32 - mean) * real), axis=(0, 1, 2)) / count
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1 - m) * mean)
            self.moving_variance.assign(m * self.moving_variance + (1 - m) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        scale = self.gamma * ops.rsqrt(variance + self.epsilon)
        shift = self.beta - mean * scale
        return x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)

    def compute_output_shape(self, x_shape, lengths_shape=None):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


# ----------------------------------------------------------------------------- pooling


def adaptive_bins(size: int, n: int) -> list[tuple[int, int]]:
    """Bin i of n over ``size`` positions covers [floor(i*size/n), ceil((i+1)*size/n)).

    This is the placement of adaptive max pooling: the bins cover every position, each bin is
    non-empty for every size >= 1, and bins overlap when size is not a multiple of n
    (in particular when size < n).
    """
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


def bin_max(x, axis: int, start, end):
    """Max of ``x`` (B, ...) over positions [start, end) along ``axis``, for n bins at once.

    ``start`` and ``end`` (B, n) int32 are each utterance's bins, 0 <= start < end <=
    x.shape[axis]. Each bin's positions are gathered, the narrower bins repeating their
    last position up to the widest bin's width, and maxed: the work is about n x the widest
    bin positions, not n x the whole axis as a mask over all of it would be. A repeated
    position changes neither the max nor the gradient (it is summed back to the one
    position). Returns x with ``axis`` replaced by the n bins.
    """
    import tensorflow as tf

    width = ops.max(end - start)
    positions = start[:, :, None] + ops.arange(width, dtype="int32")[None, None, :]  # (B, n, W)
    positions = ops.minimum(positions, end[:, :, None] - 1)
    batch, n = ops.shape(start)[0], ops.shape(start)[1]
    gathered = tf.gather(x, ops.reshape(positions, (batch, -1)), axis=axis, batch_dims=1)
    dims = [ops.shape(x)[a] if x.shape[a] is None else x.shape[a] for a in range(x.ndim)]
    gathered = ops.reshape(gathered, (batch, *dims[1:axis], n, width, *dims[axis + 1:]))
    return ops.max(gathered, axis=axis + 1)


def length_bins(lengths, n: int):
    """(B, n) start and end of ``adaptive_bins(L, n)`` for each utterance's length L."""
    i = ops.arange(n, dtype="int32")[None, :]
    lengths = ops.cast(lengths, "int32")[:, None]
    return (i * lengths) // n, ((i + 1) * lengths + n - 1) // n  # ceil, non-negative ints


@keras.saving.register_keras_serializable(package="mdser")
class MaskedGlobalMaxPooling(keras.layers.Layer):
    """GMP: max over all frequencies and the real frames -> (B, 1, C), one 'bin' per map."""

    def call(self, x, lengths):
        neg_inf = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
        inside = frame_mask(lengths, ops.shape(x)[2])[:, None, :, None]
        pooled = ops.max(ops.where(inside, x, neg_inf), axis=(1, 2))  # (B, C)
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
        batch, n_frames, channels = ops.shape(x)[0], ops.shape(x)[2], x.shape[3]
        levels = []
        for n in self.levels:
            if n_freq % n == 0:  # n equal, disjoint bins: a reshape and one max, no gather
                by_freq = ops.max(ops.reshape(x, (-1, n, n_freq // n, n_frames, channels)), axis=2)
            else:
                freq_start, freq_end = (ops.broadcast_to(ops.convert_to_tensor(b[None]), (batch, n))
                                        for b in np.array(adaptive_bins(n_freq, n), np.int32).T)
                by_freq = bin_max(x, 1, freq_start, freq_end)  # (B, n, T, C)
            grid = bin_max(by_freq, 2, *length_bins(lengths, n))  # (B, n, n, C)
            levels.append(ops.reshape(grid, (-1, n * n, channels)))
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
