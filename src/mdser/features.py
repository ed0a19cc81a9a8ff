"""3-channel log-mel spectrogram (paper section "3D Log-Mel spectrogram", Eq. 3-6)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.fft

from mdser.console import progress_bar
from mdser.errors import UserError
from mdser.stores import (
    AUDIO_FILE,
    FEATURES_FILE,
    INDEX_FILE,
    UTTERANCES_PER_JOB,
    open_audio,
    parallel_map,
    read_meta,
    sha256_file,
    write_index,
    write_meta,
)


def stft_geometry(features: dict[str, Any], sample_rate: int) -> tuple[int, int]:
    """Window and hop in samples: 25 ms Hamming window, 10 ms hop (15 ms overlap)."""
    win = round(features["win_ms"] * sample_rate / 1000)
    hop = round(features["hop_ms"] * sample_rate / 1000)
    if win > features["n_fft"]:
        raise UserError(
            f"features.win_ms = {features['win_ms']} gives {win} samples, more than "
            f"features.n_fft = {features['n_fft']}"
        )
    return win, hop


def n_frames(n_samples: int, hop: int) -> int:
    """Frames of a centred STFT (librosa's default)."""
    return 1 + n_samples // hop


@functools.lru_cache(maxsize=8)
def hamming_window(n_fft: int, win: int) -> np.ndarray:
    """A periodic Hamming window of `win` samples centred in `n_fft` zeros."""
    window = np.zeros(n_fft, np.float32)
    start = (n_fft - win) // 2
    window[start : start + win] = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / win)
    return window


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Eq. 3: f_mel = 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    """The inverse of Eq. 3."""
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_band_edges(sample_rate: int, n_mels: int) -> np.ndarray:
    """The n_mels + 2 frequencies (Hz) evenly spaced on the mel scale of Eq. 3 from 0 Hz to
    Nyquist: band j rises from edge j, peaks at edge j + 1 (its centre), falls to edge j + 2."""
    return mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """FB of Eq. 4, shape (n_fft // 2 + 1, n_mels): triangles at points evenly spaced
    on the mel scale of Eq. 3 from 0 Hz to Nyquist, each scaled to unit area
    (the HTK mel scale with Slaney area normalisation, as librosa's `htk=True`)."""
    edges = mel_band_edges(sample_rate, n_mels)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]).T.astype(np.float32)


def vtlp_source_bands(alpha: float, sample_rate: int, n_mels: int, f_hi: float = 4800.0) -> np.ndarray:
    """Vocal tract length perturbation (Jaitly & Hinton 2013, Eq. 1) on mel bands: for each
    band of the warped spectrogram, the fractional index of the original band it reads.

    The warp maps f to alpha f below the boundary F_hi min(alpha, 1) / alpha and linearly
    from there to Nyquist (which stays fixed); band j of the warped spectrogram holds the
    original spectrum at w^-1(c_j), c_j the band's centre (the filterbank of Eq. 4)."""
    nyquist = sample_rate / 2
    centres = mel_band_edges(sample_rate, n_mels)[1:-1]
    boundary = f_hi * min(alpha, 1.0) / alpha
    knots = np.array([0.0, boundary, nyquist])
    warped = np.array([0.0, alpha * boundary, nyquist])
    source = np.interp(centres, warped, knots)  # w is piecewise linear: invert it knot by knot
    return np.interp(source, centres, np.arange(n_mels, dtype=np.float64))


def vtlp_matrix(alpha: float, sample_rate: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_mels) linear interpolation that applies `vtlp_source_bands` to a band axis."""
    source = vtlp_source_bands(alpha, sample_rate, n_mels)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n_mels - 1)
    frac = source - low
    matrix = np.zeros((n_mels, n_mels))
    rows = np.arange(n_mels)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix.astype(np.float32)


def vtlp(x: np.ndarray, alphas: np.ndarray, sample_rate: int) -> np.ndarray:
    """A batch (B, n_mels, T, C) with utterance b warped by `vtlp_matrix(alphas[b])`
    along its bands; zero padding stays zero."""
    matrices = np.stack([vtlp_matrix(float(a), sample_rate, x.shape[1]) for a in alphas])
    return np.einsum("bjk,bktc->bjtc", matrices, x).astype(np.float32)


def log_mel(y: np.ndarray, sample_rate: int, features: dict[str, Any]) -> np.ndarray:
    """Log-mel spectrogram, Eq. 4: log sum_i FB(i) |X(i)|^2; shape (frames, n_mels).

    X is the centred STFT (zero-padded by n_fft / 2 at both ends, as librosa's
    default), one frame per hop, Hamming-windowed.
    """
    win, hop = stft_geometry(features, sample_rate)
    n_fft = features["n_fft"]
    padded = np.pad(np.asarray(y, np.float32), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    spectrum = scipy.fft.rfft(frames * hamming_window(n_fft, win), axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    fb = mel_filterbank(sample_rate, n_fft, features["n_mels"])
    return np.log(power @ fb + np.float32(1e-10))


def delta(x: np.ndarray, n: int) -> np.ndarray:
    """Regression delta along time (axis 0), Eq. 5, edges replicated.

    d_t = sum_{k=1..N} k (x_{t+k} - x_{t-k}) / (2 sum_{k=1..N} k^2)
    """
    padded = np.pad(x, [(n, n)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    t = x.shape[0]
    acc = np.zeros_like(x, dtype=np.float64)
    for k in range(1, n + 1):
        acc += k * (padded[n + k : n + k + t] - padded[n - k : n - k + t])
    return (acc / (2 * sum(k * k for k in range(1, n + 1)))).astype(x.dtype)


def three_channel(y: np.ndarray, sample_rate: int, features: dict[str, Any]) -> np.ndarray:
    """(frames, n_mels, 3): log-mel, its delta (Eq. 5) and delta-delta (Eq. 6)."""
    spec = log_mel(y, sample_rate, features)
    d1 = delta(spec, features["delta_n"])
    d2 = delta(d1, features["delta_n"])
    return np.stack([spec, d1, d2], axis=-1)


def _featurize_into_store(job: tuple[Path, Path, list[tuple[int, int, int]], int, dict[str, Any]]) -> int:
    """Featurize utterances (sample offset, samples, frame offset) of the audio file
    straight into the feature file: both are memory maps, so no audio or feature
    array travels between processes. Returns how many it featurized."""
    audio_file, features_file, utterances, sample_rate, features = job
    samples = np.memmap(audio_file, dtype="<f4", mode="r")
    store = np.load(features_file, mmap_mode="r+")
    for start, length, offset in utterances:
        x = three_channel(samples[start : start + length], sample_rate, features)
        store[offset : offset + len(x)] = x
    store.flush()
    return len(utterances)


def build_feature_store(audio_store: Path, out: Path, features: dict[str, Any]) -> pd.DataFrame:
    """Featurize every utterance of the audio store into `out` (streamed, bounded memory)."""
    index, _ = open_audio(audio_store)
    sample_rate = read_meta(audio_store)["sample_rate"]
    _, hop = stft_geometry(features, sample_rate)
    index = index.copy()
    index["frames"] = [n_frames(int(n), hop) for n in index["n_samples"]]
    index["offset"] = np.concatenate([[0], np.cumsum(index["frames"])[:-1]]).astype(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(
        out / FEATURES_FILE, mode="w+", dtype=np.float32,
        shape=(int(index["frames"].sum()), features["n_mels"], 3),
    ).flush()
    utterances = list(zip(index["sample_offset"].tolist(), index["n_samples"].tolist(),
                          index["offset"].tolist(), strict=True))
    jobs = (
        (audio_store / AUDIO_FILE, out / FEATURES_FILE, utterances[i : i + UTTERANCES_PER_JOB],
         sample_rate, features)
        for i in range(0, len(utterances), UTTERANCES_PER_JOB)
    )
    with progress_bar("featurize", len(utterances)) as bar:
        for done in parallel_map(_featurize_into_store, jobs):
            bar.update(done)
    columns = ["utt_id", "speaker", "emotion", "offset", "frames"]
    write_index(index[columns], out / INDEX_FILE)
    meta = read_meta(audio_store) | {"features": features, "index_sha256": sha256_file(out / INDEX_FILE)}
    write_meta(out, meta)
    return index[columns]


def standardization(frames: np.ndarray, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all frames of `rows` (the paper: over the corpus)."""
    total, sq, n = np.zeros(3), np.zeros(3), 0
    for r in rows.itertuples():
        x = frames[int(r.offset) : int(r.offset) + int(r.frames)].astype(np.float64)
        total += x.sum(axis=(0, 1))
        sq += (x * x).sum(axis=(0, 1))
        n += x.shape[0] * x.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


# A (band, channel) whose values barely move over a speaker's frames (an empty band of
# band-limited audio sits at log(1e-10)) is centred, not blown up by a tiny std.
SPEAKER_STD_FLOOR = 1e-3


def input_frames(frames: np.ndarray, rows: pd.DataFrame, standardize: str) -> np.ndarray:
    """The frames the CNN rows, the baseline and `mdser predict` read: speaker-normalised
    (`speaker_standardized`) with `train.standardize: speaker`, else `frames` as stored
    (the per-channel statistics of `standardization` are applied later, per fold)."""
    return speaker_standardized(frames, rows) if standardize == "speaker" else frames


def speaker_standardized(frames: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """Speaker normalisation (`train.standardize: speaker`): a float32 copy of `frames` in
    which every speaker's frames are standardised per (band, channel) by that speaker's own
    mean and standard deviation over all of its frames in `rows` (a feature-store index
    with offset, frames and speaker; frames outside `rows` are copied unchanged).

    Uses no labels, and one speaker's output depends on that speaker's audio only, so a
    test speaker's statistics never reach the training speakers' input (nor the other way
    round). It is not the paper's global standardisation: speaker-wise normalisation is
    the usual practice of speaker-independent emotion recognition (README *Choices*)."""
    out = np.array(frames, dtype=np.float32)
    for _, group in rows.groupby("speaker", sort=True):
        spans = [slice(int(o), int(o) + int(n))
                 for o, n in zip(group["offset"], group["frames"], strict=True)]
        x = np.concatenate([frames[s] for s in spans]).astype(np.float64)
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), SPEAKER_STD_FLOOR)
        for s in spans:
            out[s] = ((frames[s] - mean) / std).astype(np.float32)
    return out
