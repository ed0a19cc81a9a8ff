"""Reading, checking, down-mixing and resampling audio.

`read_audio` is the one place where a corpus file is decoded; it turns every
way a file can be unusable into an `AudioError` with a short machine-readable
`reason`, which the corpus readers record in the manifest.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SILENCE_LEVEL = 1e-6  # |x| at or below this everywhere counts as digital silence
AUDIO_REASONS = ("unreadable", "empty", "nan", "silent", "too_short")


class AudioError(Exception):
    """An audio file that cannot be used; `reason` is one of `AUDIO_REASONS`."""

    def __init__(self, reason: str, path: Path | str, detail: str = "") -> None:
        if reason not in AUDIO_REASONS:
            raise ValueError(f"unknown audio error reason {reason!r}")
        self.reason = reason
        self.path = Path(path)
        msg = f"{path}: {reason}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


def wav_truncation(path: Path) -> str:
    """Describe how a RIFF/WAVE file is cut short, or return "" if it is whole.

    libsndfile silently decodes what is there when the `data` chunk is shorter
    than its header says; we want such files reported, not half-used.
    Non-RIFF files (FLAC, RF64, ...) return "" and are left to libsndfile.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return ""
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):  # streamed writer left it open
                    return ""
                available = size - pos - 8
                if chunk_size > available:
                    return f"data chunk declares {chunk_size} bytes, file holds {available}"
                return ""
            pos += 8 + chunk_size + (chunk_size & 1)
        return "no data chunk"


def read_audio(path: Path, min_duration: float = 0.0) -> tuple[np.ndarray, int]:
    """Decode `path` to float32 samples shaped (frames, channels) and its sample rate.

    Raises AudioError with reason "unreadable" (zero bytes, truncated, not
    decodable), "empty" (no frames), "nan" (non-finite samples), "silent"
    (digital silence) or "too_short" (shorter than `min_duration` seconds).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise AudioError("unreadable", path, "zero bytes")
        cut = wav_truncation(path)
        if cut:
            raise AudioError("unreadable", path, f"truncated: {cut}")
        y, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (OSError, RuntimeError, ValueError, struct.error) as exc:  # sf.LibsndfileError
        raise AudioError("unreadable", path, str(exc)) from exc
    if y.shape[0] == 0:
        raise AudioError("empty", path, "0 frames")
    if not np.all(np.isfinite(y)):
        raise AudioError("nan", path, "non-finite samples")
    if float(np.max(np.abs(y))) <= SILENCE_LEVEL:
        raise AudioError("silent", path, "digital silence")
    if y.shape[0] / sr < min_duration:
        raise AudioError("too_short", path, f"{y.shape[0] / sr:.3f} s < {min_duration} s")
    return y, int(sr)


def to_mono(y: np.ndarray) -> np.ndarray:
    """Mean over channels of a (frames, channels) array; 1-D input is returned as is."""
    y = np.asarray(y, dtype=np.float32)
    return y if y.ndim == 1 else y.mean(axis=1, dtype=np.float32)


def resample(y: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Mono float32 signal at `target_sr` (soxr, 'HQ'); multi-channel input is down-mixed."""
    y = to_mono(y)
    if sr == target_sr:
        return y
    return soxr.resample(y, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
