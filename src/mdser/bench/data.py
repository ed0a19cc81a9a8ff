"""Synthetic data for the benchmark's timings: corpus shapes, lengths, stores, corpora.

`IEMOCAP` / `EMODB` give the sizes the projection assumes; `synthetic_lengths` draws
IEMOCAP-like utterance lengths; `synthetic_store` is an in-memory feature store shaped like
`open_features`; `make_corpus` writes the built-in synthetic corpus (audio files) at a size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IEMOCAP = {"utterances": 2943, "mean_s": 4.5, "classes": 4}  # improvised, 4 classes
EMODB = {"utterances": 535, "mean_s": 2.8, "classes": 7}
FRAMES_PER_S = 100  # 10 ms hop


def synthetic_lengths(n: int, rng: np.random.Generator, mean_s: float = 4.5,
                      lo_s: float = 0.6, hi_s: float = 30.0, sigma: float = 0.6) -> np.ndarray:
    """IEMOCAP-like utterance lengths in frames: log-normal, mean ~ mean_s, clipped."""
    mu = np.log(mean_s) - sigma**2 / 2
    seconds = np.clip(rng.lognormal(mu, sigma, n), lo_s, hi_s)
    return np.maximum(np.round(seconds * FRAMES_PER_S), 2).astype(np.int64)


def synthetic_store(lengths: np.ndarray, n_mels: int, n_classes: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """A feature store in memory shaped like `open_features`: (frames, index, labels)."""
    frames = rng.standard_normal((int(lengths.sum()), n_mels, 3), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    index = pd.DataFrame({"utt_id": [f"u{i:05d}" for i in range(lengths.size)],
                          "offset": offsets, "frames": lengths})
    labels = np.arange(lengths.size) % n_classes
    return frames, index, rng.permutation(labels).astype(np.int32)


def make_corpus(params: dict[str, Any], utterances: int, raw_dir: Path) -> pd.DataFrame:
    """The built-in synthetic corpus with `utterances` utterances; its kept manifest."""
    from mdser.corpora import prepare

    data = params["data"] | {"corpus": "synth"}
    data["synth"] = data["synth"] | {"utterances": utterances}
    manifest, _ = prepare(data, raw_dir)
    return manifest


def synthetic_set(n: int, n_mels: int, n_classes: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, np.ndarray]:
    """`n` IEMOCAP-like utterances from one seed: (lengths, frames, index, labels)."""
    rng = np.random.default_rng(seed)
    lengths = synthetic_lengths(n, rng)
    return (lengths, *synthetic_store(lengths, n_mels, n_classes, rng))


def no_standardization() -> tuple[np.ndarray, np.ndarray]:
    """Mean 0, std 1 per channel: the synthetic frames are standard normal already."""
    return np.zeros(3, np.float32), np.ones(3, np.float32)
