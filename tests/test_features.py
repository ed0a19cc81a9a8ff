"""Features (paper Eq. 3-6) against independent numpy / librosa computations."""

import librosa
import numpy as np
import pandas as pd
import pytest

from mdser.features import (
    delta,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    n_frames,
    speaker_standardized,
    three_channel,
    vtlp,
)

FEATURES = {"n_mels": 40, "n_fft": 512, "win_ms": 25, "hop_ms": 10, "delta_n": 9}
SR = 16000


def numpy_log_mel(y: np.ndarray) -> np.ndarray:
    """Centred STFT with a 400-sample periodic Hamming window inside 512 points, HTK mel."""
    n_fft, win, hop = 512, 400, 160
    window = np.zeros(n_fft)
    start = (n_fft - win) // 2
    window[start : start + win] = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / win)
    padded = np.pad(y, n_fft // 2)
    count = 1 + (padded.size - n_fft) // hop
    frames = np.stack([padded[i * hop : i * hop + n_fft] for i in range(count)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    fb = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=40, htk=True)
    return np.log(power @ fb.T + 1e-10)


def test_log_mel_matches_numpy_stft():
    y = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    ours = log_mel(y, SR, FEATURES)
    assert ours.shape == (n_frames(y.size, 160), 40)
    np.testing.assert_allclose(ours, numpy_log_mel(y), atol=2e-3)


@pytest.mark.parametrize("duration", [0.3, 1.0, 2.71])
def test_log_mel_matches_librosa_melspectrogram(duration):
    y = np.random.default_rng(3).standard_normal(int(SR * duration)).astype(np.float32) * 0.1
    power = librosa.feature.melspectrogram(
        y=y, sr=SR, n_fft=512, win_length=400, hop_length=160, window="hamming",
        center=True, power=2.0, n_mels=40, htk=True,
    )
    ours = log_mel(y, SR, FEATURES)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.log(power + 1e-10).T, atol=1e-4)


def test_mel_scale_is_eq3():
    # Eq. 3: f_mel = 2595 log10(1 + f / 700); librosa's HTK mel is the same formula
    f = np.array([0.0, 700.0, 4000.0, 8000.0])
    np.testing.assert_allclose(hz_to_mel(f), 2595 * np.log10(1 + f / 700))
    np.testing.assert_allclose(hz_to_mel(f), librosa.hz_to_mel(f, htk=True))
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)


@pytest.mark.parametrize(("sr", "n_fft", "n_mels"), [(16000, 512, 40), (22050, 1024, 64), (8000, 256, 20)])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels):
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True)
    fb = mel_filterbank(sr, n_fft, n_mels)
    assert fb.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(fb.T, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_delta_matches_librosa_regression(n):
    x = np.random.default_rng(1).standard_normal((50, 4))
    ref = librosa.feature.delta(x.T, width=2 * n + 1, order=1, mode="nearest").T
    np.testing.assert_allclose(delta(x, n), ref, atol=1e-10)


def test_delta_formula_by_hand_in_the_interior():
    x = np.random.default_rng(2).standard_normal((40, 3))
    n, t = 9, 20
    numerator = sum(k * (x[t + k] - x[t - k]) for k in range(1, n + 1))
    expected = numerator / (2 * sum(k * k for k in range(1, n + 1)))
    np.testing.assert_allclose(delta(x, n)[t], expected)


def test_three_channel_stacks_spectrum_delta_and_delta_delta():
    y = np.sin(2 * np.pi * 220 * np.arange(SR // 2) / SR).astype(np.float32)
    x = three_channel(y, SR, FEATURES)
    assert x.shape == (n_frames(y.size, 160), 40, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 1], delta(x[..., 0], 9), atol=1e-5)
    np.testing.assert_allclose(x[..., 2], delta(x[..., 1], 9), atol=1e-5)


def speaker_store(seed=0):
    """Three speakers' utterances, interleaved in the store, each speaker with its own
    offset and scale per (band, channel)."""
    rng = np.random.default_rng(seed)
    speakers, lengths = ["a", "b", "a", "c", "b", "a"], [7, 5, 9, 4, 6, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    frames = rng.normal(size=(sum(lengths), 4, 3)).astype(np.float32)
    level = {s: (rng.normal(size=(4, 3)) * 5, rng.uniform(0.5, 3, (4, 3))) for s in "abc"}
    for s, o, n in zip(speakers, offsets, lengths, strict=True):
        frames[o : o + n] = frames[o : o + n] * level[s][1] + level[s][0]
    return frames, pd.DataFrame({"speaker": speakers, "offset": offsets, "frames": lengths})


def test_speaker_standardized_uses_each_speakers_own_statistics():
    frames, rows = speaker_store()
    got = speaker_standardized(frames, rows)
    for _, group in rows.groupby("speaker"):
        idx = np.concatenate([np.arange(o, o + n)
                              for o, n in zip(group["offset"], group["frames"], strict=True)])
        x = frames[idx].astype(np.float64)
        want = (x - x.mean(axis=0)) / x.std(axis=0)  # numpy, ddof = 0, per (band, channel)
        np.testing.assert_allclose(got[idx], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[idx].mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(got[idx].std(axis=0), 1, atol=1e-5)


def test_speaker_standardized_keeps_speakers_apart():
    """Changing one speaker's audio (a test speaker's) changes no other speaker's input."""
    frames, rows = speaker_store()
    changed = frames.copy()
    for o, n in zip(rows["offset"][rows.speaker == "c"], rows["frames"][rows.speaker == "c"], strict=True):
        changed[o : o + n] = changed[o : o + n] * 10 + 3
    before, after = speaker_standardized(frames, rows), speaker_standardized(changed, rows)
    others = np.concatenate([np.arange(o, o + n) for o, n, s in
                             zip(rows["offset"], rows["frames"], rows["speaker"], strict=True) if s != "c"])
    np.testing.assert_array_equal(before[others], after[others])


def test_speaker_standardized_centres_a_band_that_does_not_move():
    """An empty band of band-limited audio (constant log(1e-10)) and one that barely moves
    are centred, not divided by a vanishing std."""
    frames, rows = speaker_store()
    frames[:, 0, 0] = np.log(1e-10)
    frames[:, 1, 0] = 5.0 + 1e-6 * np.random.default_rng(1).standard_normal(len(frames))
    got = speaker_standardized(frames, rows)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:, 0, 0], 0.0)
    assert np.abs(got[:, 1, 0]).max() < 0.01


def jaitly_hinton_warp(f: np.ndarray, alpha: float, nyquist: float, f_hi: float = 4800.0) -> np.ndarray:
    """Eq. 1 of Jaitly & Hinton (2013), written out: the warped frequency of f."""
    boundary = f_hi * min(alpha, 1.0) / alpha
    slope = (nyquist - f_hi * min(alpha, 1.0)) / (nyquist - boundary)
    return np.where(f <= boundary, alpha * f, nyquist - slope * (nyquist - f))


@pytest.mark.parametrize("alpha", [0.9, 0.95, 1.05, 1.1])
def test_vtlp_moves_a_smooth_spectrum_to_the_warped_frequencies(alpha):
    """Bands of a smooth spectrum g(f) after `vtlp` hold g(w^-1(centre)), w^-1 found by
    bisection on Eq. 1 (independent of the knot inversion in the library)."""
    sr, n_mels = 16000, 40
    centres = mel_to_hz(np.linspace(0.0, hz_to_mel(sr / 2), n_mels + 2))[1:-1]
    g = lambda f: np.sin(f / 900.0) + f / 4000.0  # noqa: E731 - a smooth test spectrum
    lo, hi = np.zeros(n_mels), np.full(n_mels, sr / 2)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = jaitly_hinton_warp(mid, alpha, sr / 2) < centres
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    expected = g(np.clip(lo, centres[0], centres[-1]))
    x = np.broadcast_to(g(centres)[None, :, None, None], (1, n_mels, 4, 3)).astype(np.float32)
    warped = vtlp(x, np.array([alpha]), sr)
    # linear interpolation between band centres: error bounded by the curvature of g
    np.testing.assert_allclose(warped[0, :, 0, 0], expected, atol=0.03)
    assert np.abs(warped[0, :, 0, 0] - g(centres)).max() > 0.1  # it did move


def test_vtlp_of_one_is_the_identity_and_keeps_padding_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 32, 3)).astype(np.float32)
    x[:, :, 20:] = 0.0  # zero padding after the true length
    np.testing.assert_allclose(vtlp(x, np.ones(3), 16000), x, atol=1e-6)
    warped = vtlp(x, np.array([0.9, 1.0, 1.1]), 16000)
    assert not warped[:, :, 20:].any()
    np.testing.assert_allclose(warped[1], x[1], atol=1e-6)  # each utterance its own factor
