"""3-channel log-mel spectrogram (paper section "3D Log-Mel spectrogram", Eq. 3-6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import librosa
import numpy as np
import pandas as pd

from mdser.errors import UserError
from mdser.stores import (
    FEATURES_FILE,
    INDEX_FILE,
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


def log_mel(y: np.ndarray, sample_rate: int, features: dict[str, Any]) -> np.ndarray:
    """Log-mel spectrogram, Eq. 4: log sum_i FB(i) |X(i)|^2; shape (frames, n_mels)."""
    win, hop = stft_geometry(features, sample_rate)
    power = librosa.feature.melspectrogram(
        y=y, sr=sample_rate, n_fft=features["n_fft"], win_length=win, hop_length=hop,
        window="hamming", center=True, power=2.0, n_mels=features["n_mels"], htk=True,
    )
    return np.log(power + 1e-10).T.astype(np.float32)


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


def _featurize_one(args: tuple[np.ndarray, int, dict[str, Any]]) -> np.ndarray:
    y, sample_rate, features = args
    return three_channel(np.asarray(y), sample_rate, features)


def build_feature_store(audio_store: Path, out: Path, features: dict[str, Any]) -> pd.DataFrame:
    """Featurize every utterance of the audio store into `out` (streamed, bounded memory)."""
    index, samples = open_audio(audio_store)
    sample_rate = read_meta(audio_store)["sample_rate"]
    _, hop = stft_geometry(features, sample_rate)
    index = index.copy()
    index["frames"] = [n_frames(int(n), hop) for n in index["n_samples"]]
    index["offset"] = np.concatenate([[0], np.cumsum(index["frames"])[:-1]]).astype(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    store = np.lib.format.open_memmap(
        out / FEATURES_FILE, mode="w+", dtype=np.float32,
        shape=(int(index["frames"].sum()), features["n_mels"], 3),
    )
    jobs = (
        (samples[int(r.sample_offset) : int(r.sample_offset) + int(r.n_samples)], sample_rate, features)
        for r in index.itertuples()
    )
    warm_up = (np.zeros(sample_rate, np.float32), sample_rate, features)
    for r, x in zip(index.itertuples(), parallel_map(_featurize_one, jobs, warm_up=warm_up), strict=True):
        store[int(r.offset) : int(r.offset) + int(r.frames)] = x
    store.flush()
    del store
    columns = ["utt_id", "speaker", "emotion", "offset", "frames"]
    write_index(index[columns], out / INDEX_FILE)
    meta = read_meta(audio_store) | {"features": features, "index_sha256": sha256_file(out / INDEX_FILE)}
    write_meta(out, meta)
    return index[columns]
