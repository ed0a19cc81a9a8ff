"""The model's building blocks against independent numpy computations (paper Fig. 5, Eq. 9-14)."""

import math

import numpy as np
import pytest

from mdser.model import class_probabilities, per_sample_loss
from mdser.model.layers import (
    BinAttention,
    Conv2D,
    MaskedBatchNorm,
    MaskedGlobalMaxPooling,
    MaskFrames,
    MaxPool2x2,
    PoolLengths,
    SpatialPyramidPooling,
    adaptive_bins,
)

# ----------------------------------------------------------------------------- numpy references


def np_bin(i: int, n: int, size: int) -> tuple[int, int]:
    """Adaptive-pooling bin i of n over `size` positions, with float floor/ceil."""
    return math.floor(i * size / n), math.ceil((i + 1) * size / n)


def np_spp(x: np.ndarray, lengths, levels) -> np.ndarray:
    """(B, F, T, C) -> (B, sum n^2, C); bin (freq j, time i) of level n at j * n + i."""
    batch, n_freq, _, channels = x.shape
    out = []
    for b in range(batch):
        bins = []
        for n in levels:
            for j in range(n):
                f0, f1 = np_bin(j, n, n_freq)
                for i in range(n):
                    t0, t1 = np_bin(i, n, int(lengths[b]))
                    bins.append(x[b, f0:f1, t0:t1, :].reshape(-1, channels).max(axis=0))
        out.append(np.stack(bins))
    return np.stack(out)


def np_spp_gradient(x: np.ndarray, lengths, levels, upstream: np.ndarray) -> np.ndarray:
    """d sum(SPP(x) * upstream) / dx: each bin's upstream value goes to its maximum."""
    batch, n_freq, _, channels = x.shape
    grad = np.zeros_like(x)
    for b in range(batch):
        k = 0
        for n in levels:
            for j in range(n):
                f0, f1 = np_bin(j, n, n_freq)
                for i in range(n):
                    t0, t1 = np_bin(i, n, int(lengths[b]))
                    for c in range(channels):
                        window = x[b, f0:f1, t0:t1, c]
                        fi, ti = np.unravel_index(np.argmax(window), window.shape)
                        grad[b, f0 + fi, t0 + ti, c] += upstream[b, k, c]
                    k += 1
    return grad


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def padded_map(lengths, n_freq=20, channels=3, seed=0, pad_value=100.0) -> np.ndarray:
    """Random map whose padded frames hold a large value that pooling must never see."""
    rng = np.random.default_rng(seed)
    x = np.full((len(lengths), n_freq, max(lengths), channels), pad_value, np.float32)
    for b, n in enumerate(lengths):
        x[b, :, :n] = rng.normal(size=(n_freq, n, channels))
    return x


# ----------------------------------------------------------------------------- masking


def test_mask_frames_zeroes_padding_only():
    x = np.ones((2, 3, 5, 2), np.float32)
    y = np.asarray(MaskFrames()(x, np.array([5, 2], np.int32)))
    assert y[0].min() == 1.0
    assert (y[1, :, :2] == 1).all() and (y[1, :, 2:] == 0).all()


@pytest.mark.parametrize("shape", [(2, 40, 23, 3), (1, 7, 10, 2)])
def test_max_pool_2x2_valid_matches_numpy(shape):
    x = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    f, t = shape[1] // 2, shape[2] // 2
    want = np.empty((shape[0], f, t, shape[3]), np.float32)
    for i in range(f):
        for j in range(t):
            want[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
    np.testing.assert_array_equal(np.asarray(MaxPool2x2()(x)), want)


def test_max_pool_2x2_gradient_reaches_each_windows_maximum():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(7).normal(size=(2, 8, 11, 3)).astype(np.float32))
    upstream = np.random.default_rng(8).normal(size=(2, 4, 5, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(MaxPool2x2()(x) * upstream)
    got, xs = np.asarray(tape.gradient(loss, x)), np.asarray(x)
    want = np.zeros_like(xs)
    for b, i, j, c in np.ndindex(upstream.shape):
        window = xs[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        fi, ti = np.unravel_index(np.argmax(window), window.shape)
        want[b, 2 * i + fi, 2 * j + ti, c] = upstream[b, i, j, c]
    np.testing.assert_array_equal(got, want)


def np_dilated_conv_same(x: np.ndarray, kernel: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """'same' 2-D convolution (cross-correlation) with dilation, stride 1, no bias: (B, H, W, Ci)."""
    kh, kw, _, co = kernel.shape
    (dh, dw), (b, h, w, _) = dilation, x.shape
    ph, pw = dh * (kh - 1), dw * (kw - 1)
    padded = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((b, h, w, co))
    for i, j in np.ndindex(kh, kw):
        out += padded[:, i * dh:i * dh + h, j * dw:j * dw + w] @ kernel[i, j]
    return out


@pytest.mark.parametrize("path", ["native", "space_to_batch"])
@pytest.mark.parametrize("dilation", [(1, 1), (1, 2), (2, 3)])
def test_dilated_conv_and_its_gradients_match_numpy(dilation, path, monkeypatch):
    """Both paths of `Conv2D` (the kernel's own dilation where oneDNN or cuDNN has its
    gradient, Keras' SpaceToBatch elsewhere): outputs and the gradients of input, kernel and
    bias are the convolution's plus a bias per output channel."""
    import tensorflow as tf

    from mdser.model import layers

    if path == "native" and not layers.native_dilated_gradient():
        pytest.skip("no dilated-convolution gradient kernel here (TF_ENABLE_ONEDNN_OPTS=0?)")
    if path == "space_to_batch":
        monkeypatch.setattr(layers, "native_dilated_gradient", lambda: False)
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(size=(2, 6, 9, 2)).astype(np.float32))
    layer = Conv2D(3, (3, 3), padding="same", dilation_rate=dilation)
    layer.build(x.shape)
    bias = rng.normal(size=3)
    layer.bias.assign(bias.astype(np.float32))
    kernel = np.asarray(layer.kernel, np.float64)
    upstream = rng.normal(size=(2, 6, 9, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * upstream)
    grad_x, grad_k, grad_b = tape.gradient(loss, [x, layer.kernel, layer.bias])
    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(y), np_dilated_conv_same(xs, kernel, dilation) + bias,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_b), upstream.sum(axis=(0, 1, 2)), atol=1e-4)
    # loss is linear in x and in the kernel: each gradient is the loss of a unit perturbation
    want_x = np.zeros_like(xs)
    for idx in np.ndindex(xs.shape):
        unit = np.zeros_like(xs)
        unit[idx] = 1.0
        want_x[idx] = np.sum(np_dilated_conv_same(unit, kernel, dilation) * upstream)
    want_k = np.zeros_like(kernel)
    for idx in np.ndindex(kernel.shape):
        unit = np.zeros_like(kernel)
        unit[idx] = 1.0
        want_k[idx] = np.sum(np_dilated_conv_same(xs, unit, dilation) * upstream)
    np.testing.assert_allclose(np.asarray(grad_x), want_x, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad_k), want_k, atol=1e-4)


def test_importing_mdser_turns_onednn_on_unless_the_user_chose():
    """oneDNN's kernels (and with them the dilated gradient) on every CPU, set before any
    import of TensorFlow; a user's TF_ENABLE_ONEDNN_OPTS wins."""
    import os
    import subprocess
    import sys

    code = "import os, mdser; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    for given, want in ((None, "1"), ("0", "0")):
        run_env = env if given is None else env | {"TF_ENABLE_ONEDNN_OPTS": given}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == want


def test_masked_batch_norm_training_uses_real_frames_only():
    """Training-mode output and moving averages against numpy statistics over the real
    frames only; the padded frames (value 100) must not move them."""
    lengths = [12, 7, 3]
    x = padded_map(lengths, n_freq=5, channels=4, seed=5)
    real = np.concatenate([x[b, :, :n].reshape(-1, 4) for b, n in enumerate(lengths)])
    mean, var = real.mean(axis=0), real.var(axis=0)
    layer = MaskedBatchNorm(momentum=0.9, epsilon=1e-3)
    y = np.asarray(layer(x, np.array(lengths, np.int32), training=True))
    want = (x - mean) / np.sqrt(var + 1e-3)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(y[b, :, :n], want[b, :, :n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), 0.9 + 0.1 * var, rtol=1e-5)


def test_masked_batch_norm_inference_is_a_fixed_affine_map():
    layer = MaskedBatchNorm()
    x = padded_map([6, 4], n_freq=3, channels=2, seed=6)
    layer.build(x.shape)
    layer.gamma.assign([2.0, 0.5])
    layer.beta.assign([1.0, -1.0])
    layer.moving_mean.assign([0.3, -0.2])
    layer.moving_variance.assign([4.0, 0.25])
    got = np.asarray(layer(x, np.array([6, 4], np.int32)))
    scale = np.array([2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25]) + 1e-3)
    want = (x - np.array([0.3, -0.2])) * scale + np.array([1.0, -1.0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pool_lengths_floor():
    lengths = np.array([1, 2, 23, 57, 100], np.int32)
    np.testing.assert_array_equal(np.asarray(PoolLengths(2)(lengths)), lengths // 2)


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 11, 20, 53])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_adaptive_bins_nonempty_and_covering(size, n):
    bins = adaptive_bins(size, n)
    assert bins == [np_bin(i, n, size) for i in range(n)]
    assert all(0 <= lo < hi <= size for lo, hi in bins)
    covered = np.zeros(size, bool)
    for lo, hi in bins:
        covered[lo:hi] = True
    assert covered.all()


@pytest.mark.parametrize("levels", [[1, 5, 10], [1, 2, 5, 10], [1, 2, 5, 8, 10]])
def test_spp_matches_numpy(levels):
    lengths = [12, 7, 3, 1]  # full, odd, shorter than the level (bins overlap), one frame
    x = padded_map(lengths)
    got = np.asarray(SpatialPyramidPooling(levels)(x, np.array(lengths, np.int32)))
    assert got.shape == (4, sum(n * n for n in levels), 3)
    np.testing.assert_allclose(got, np_spp(x, lengths, levels), rtol=0, atol=0)
    assert got.max() < 100.0  # no padded frame entered a bin


@pytest.mark.parametrize("levels", [[1, 5, 10], [1, 2, 5, 8, 10]])
def test_spp_gradient_reaches_each_bins_maximum_only(levels):
    import tensorflow as tf

    lengths = [12, 7, 3, 1]
    x = tf.constant(padded_map(lengths, seed=3))
    upstream = np.random.default_rng(4).normal(
        size=(4, sum(n * n for n in levels), 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = SpatialPyramidPooling(levels)(x, np.array(lengths, np.int32))
        loss = tf.reduce_sum(y * upstream)
    got = np.asarray(tape.gradient(loss, x))
    want = np_spp_gradient(np.asarray(x), lengths, levels, upstream)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_spp_known_values():
    # One channel, F = 2, L = 3 real frames, level 2: freq bins [0,1), [1,2); time bins
    # [0,2), [1,3) overlap in frame 1.
    x = np.array([[[1, 5, 2, 99], [7, 0, 3, 99]]], np.float32)[..., None]
    got = np.asarray(SpatialPyramidPooling([1, 2])(x, np.array([3], np.int32)))[0, :, 0]
    np.testing.assert_array_equal(got, [7, 5, 5, 7, 3])


def test_gmp_matches_numpy():
    lengths = [12, 7, 3, 1]
    x = padded_map(lengths, seed=1)
    got = np.asarray(MaskedGlobalMaxPooling()(x, np.array(lengths, np.int32)))
    want = np.stack([x[b, :, :n].max(axis=(0, 1)) for b, n in enumerate(lengths)])[:, None]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np_spp(x, lengths, [1]))  # GMP is SPP(1)


# ----------------------------------------------------------------------------- attention


def test_attention_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 126, 4)).astype(np.float32)  # K = 1 + 25 + 100 bins
    layer = BinAttention(5)
    y, alpha = (np.asarray(t) for t in layer(x))
    w, b, u = (np.asarray(v) for v in (layer.w, layer.b, layer.u))
    v = 1.0 / (1.0 + np.exp(-(x @ w + b)))  # Eq. 9
    want_alpha = np.exp(np_log_softmax(v @ u))  # Eq. 10
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, atol=1e-6)
    k = x.shape[1]  # Eq. 11, rescaled by the number of bins K
    np.testing.assert_allclose(y, k * x * want_alpha[:, :, None], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- heads and losses

M, S = 0.5, 2.0
ARCFACE = {"m": M, "s": S}


def np_arcface_logits(cos: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eq. 13 written with arccos; beyond theta + m > pi the reference fallback cos - m sin m."""
    logits = S * cos.astype(np.float64)
    for b, y in enumerate(labels):
        theta = math.acos(min(max(float(cos[b, y]), -1 + 1e-7), 1 - 1e-7))
        if theta + M < math.pi:
            logits[b, y] = S * math.cos(theta + M)
        else:
            logits[b, y] = S * (cos[b, y] - M * math.sin(M))
    return logits


def test_arcface_loss_matches_formula_including_theta_plus_m_beyond_pi():
    rng = np.random.default_rng(3)
    cos = rng.uniform(-0.9, 0.9, size=(5, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1])
    cos[0, 0] = 0.9  # small angle
    cos[1, 1] = 0.0
    cos[2, 2] = -0.99  # theta ~ 3.0 rad: theta + m > pi, the safe branch
    cos[3, 3] = -0.5  # theta ~ 2.09: theta + m < pi
    cos[4, 1] = -1.0  # the clip
    assert math.acos(-0.99) + M > math.pi
    logits = np_arcface_logits(cos, labels)
    want = -np_log_softmax(logits)[np.arange(5), labels]
    got = np.asarray(per_sample_loss("arcface", ARCFACE)(labels, cos))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the margin only ever lowers the target logit, so the loss exceeds plain softmax(s cos)
    plain = -np_log_softmax(S * cos.astype(np.float64))[np.arange(5), labels]
    assert (got > plain).all()


def test_arcface_logits_safe_branch_value():
    from mdser.model.heads import arcface_logits

    cos = np.array([[-0.99, 0.2]], np.float32)
    got = np.asarray(arcface_logits(cos, np.array([0]), M, S))
    np.testing.assert_allclose(got, [[S * (-0.99 - M * math.sin(M)), S * 0.2]], rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_matches_numpy(smoothing):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, size=6)
    target = np.eye(7)[labels] * (1 - smoothing) + smoothing / 7
    want = -(target * np_log_softmax(logits.astype(np.float64))).sum(axis=1)
    loss = per_sample_loss("softmax", {"label_smoothing": smoothing})
    np.testing.assert_allclose(np.asarray(loss(labels, logits)), want, rtol=1e-5, atol=1e-6)


def test_class_probabilities_apply_no_margin():
    rng = np.random.default_rng(5)
    cos = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
    probs = class_probabilities("arcface", cos, ARCFACE)
    assert isinstance(probs, np.ndarray)
    np.testing.assert_allclose(probs, np.exp(np_log_softmax(S * cos)), rtol=1e-5, atol=1e-7)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(class_probabilities("softmax", logits, {}),
                               np.exp(np_log_softmax(logits)), rtol=1e-5, atol=1e-7)
