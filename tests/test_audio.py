"""read_audio's bad-input reasons, down-mixing and resampling."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mdser.audio import AudioError, read_audio, resample, to_mono, wav_truncation


def tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    y = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def write(path: Path, y: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> Path:
    sf.write(path, y, sr, subtype=subtype)
    return path


def test_reads_pcm_as_float32_frames_by_channels(tmp_path):
    y, sr = read_audio(write(tmp_path / "a.wav", tone(1.0, 16000)))
    assert sr == 16000 and y.dtype == np.float32 and y.shape == (16000, 1)


def test_zero_byte_file_is_unreadable(tmp_path):
    (tmp_path / "z.wav").write_bytes(b"")
    with pytest.raises(AudioError) as err:
        read_audio(tmp_path / "z.wav")
    assert err.value.reason == "unreadable" and "zero bytes" in str(err.value)


def test_truncated_file_is_unreadable(tmp_path):
    path = write(tmp_path / "t.wav", tone(1.0, 16000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "declares" in wav_truncation(path)
    with pytest.raises(AudioError) as err:
        read_audio(path)
    assert err.value.reason == "unreadable" and "truncated" in str(err.value)


def test_truncated_inside_header_and_garbage_are_unreadable(tmp_path):
    path = write(tmp_path / "h.wav", tone(1.0, 16000))
    path.write_bytes(path.read_bytes()[:30])
    (tmp_path / "g.wav").write_bytes(b"this is not audio at all" * 10)
    for p in (path, tmp_path / "g.wav"):
        with pytest.raises(AudioError) as err:
            read_audio(p)
        assert err.value.reason == "unreadable"


def test_zero_frames_is_empty(tmp_path):
    path = write(tmp_path / "e.wav", np.zeros(0))
    with pytest.raises(AudioError) as err:
        read_audio(path)
    assert err.value.reason == "empty"


def test_digital_silence(tmp_path):
    with pytest.raises(AudioError) as err:
        read_audio(write(tmp_path / "s.wav", np.zeros(16000)))
    assert err.value.reason == "silent"


def test_nan_samples_in_float_wav(tmp_path):
    y = tone(1.0, 16000).astype(np.float32)
    y[100] = np.nan
    with pytest.raises(AudioError) as err:
        read_audio(write(tmp_path / "n.wav", y, subtype="FLOAT"))
    assert err.value.reason == "nan"


def test_too_short_only_when_asked(tmp_path):
    path = write(tmp_path / "short.wav", tone(0.2, 16000))
    assert read_audio(path)[0].shape[0] == 3200
    with pytest.raises(AudioError) as err:
        read_audio(path, min_duration=0.5)
    assert err.value.reason == "too_short"


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    path = write(tmp_path / "st.wav", tone(1.0, 44100, channels=2), sr=44100)
    y, sr = read_audio(path)
    assert y.shape == (44100, 2) and sr == 44100
    out = resample(y, sr, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.shape[0] - 16000) <= 1
    # the 220 Hz tone survives: spectrum peak at 220 Hz
    spec = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spec) * 16000 / out.shape[0] - 220) < 2


def test_to_mono_and_identity_resample():
    y = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(to_mono(y), [0.5, 0.5])
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
