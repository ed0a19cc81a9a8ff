"""Feature-extraction timing: the repository's resample + featurize against a librosa loop.

Each timed job runs in a fresh interpreter, as a DVC stage does (no TensorFlow loaded),
timed from the import of its own modules, with the peak memory of its process tree:

    python -m mdser.bench.features {repo,librosa} MANIFEST_CSV RAW_DIR WORK

prints its JSON result on a line starting ``@@``; `in_fresh_process` runs it.
`feature_profile` splits the library's per-utterance work in this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.bench import ROOT, print_result, read_result
from mdser.bench.machine import PeakMemory


def in_fresh_process(kind: str, manifest_csv: Path, raw_dir: Path, work: Path | None = None
                     ) -> dict[str, Any]:
    """Run the `kind` job (``python -m mdser.bench.features``) in a fresh interpreter; return
    its JSON result with the peak memory of its process tree."""
    cmd = [sys.executable, "-m", "mdser.bench.features", kind, str(manifest_csv), str(raw_dir),
           *([str(work)] if work else [])]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    with PeakMemory(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"features job {kind} failed ({proc.returncode}):\n{err[-3000:]}")
    result = read_result(out)
    return result | {"peak_rss_mib": mem.peak_rss / 2**20, "peak_pss_mib": mem.peak_pss / 2**20,
                     "peak_anon_mib": mem.peak_anon / 2**20}


def repo_features(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path, work: Path
                  ) -> dict[str, Any]:
    """The repository's resample + featurize, timed with their imports (as a stage pays them)."""
    audio, feats = work / "audio", work / "features"
    for d in (audio, feats):
        shutil.rmtree(d, ignore_errors=True)
    audio.mkdir(parents=True)
    sr = params["audio"]["sample_rate"]
    t0 = time.perf_counter()
    from mdser.features import build_feature_store
    from mdser.stores import build_audio_store, write_meta

    build_audio_store(manifest, raw_dir, audio, sr)
    write_meta(audio, {"sample_rate": sr, "manifest_sha256": "bench"})
    t1 = time.perf_counter()
    index = build_feature_store(audio, feats, params["features"])
    t2 = time.perf_counter()
    kept = manifest[manifest["status"] == "kept"]
    seconds = float(kept["duration"].sum())
    size = sum(p.stat().st_size for p in feats.iterdir())
    return {
        "utterances": len(kept), "audio_s": seconds, "resample_s": t1 - t0,
        "featurize_s": t2 - t1, "wall_s": t2 - t0, "audio_s_per_s": seconds / (t2 - t0),
        "store_bytes": size, "workers": os.cpu_count(), "frames": int(index["frames"].sum()),
        "feature_store": str(feats),
    }


def librosa_loop(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path
                 ) -> dict[str, Any]:
    """The naive way: per file librosa.load(sr=16k), melspectrogram, delta twice; timed with
    librosa's import and its lazy submodules' (as a stage pays them)."""
    from mdser.corpora import resolve_path

    f, sr = params["features"], params["audio"]["sample_rate"]
    win, hop = round(f["win_ms"] * sr / 1000), round(f["hop_ms"] * sr / 1000)
    kept = manifest[manifest["status"] == "kept"]
    frames = 0
    t0 = time.perf_counter()
    import librosa

    for r in kept.itertuples():
        y, _ = librosa.load(resolve_path(r.path, raw_dir), sr=sr)
        s = np.log(librosa.feature.melspectrogram(
            y=y, sr=sr, n_fft=f["n_fft"], win_length=win, hop_length=hop, window="hamming",
            n_mels=f["n_mels"], htk=True) + 1e-10)
        d1 = librosa.feature.delta(s, width=2 * f["delta_n"] + 1)
        d2 = librosa.feature.delta(d1, width=2 * f["delta_n"] + 1)
        frames += np.stack([s, d1, d2], axis=-1).shape[1]
    wall = time.perf_counter() - t0
    seconds = float(kept["duration"].sum())
    return {"utterances": len(kept), "audio_s": seconds, "wall_s": wall,
            "audio_s_per_s": seconds / wall, "frames": frames}


def feature_profile(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path,
                    n: int = 20) -> dict[str, Any]:
    """Single-process time split of the library's per-utterance work (for the profile)."""
    from mdser import audio
    from mdser.corpora import resolve_path
    from mdser.features import delta, log_mel

    f, sr = params["features"], params["audio"]["sample_rate"]
    split = {"read_s": 0.0, "resample_s": 0.0, "log_mel_s": 0.0, "delta_x2_s": 0.0,
             "librosa_delta_x2_s": 0.0}
    import librosa

    kept = manifest[manifest["status"] == "kept"].head(n)
    for r in kept.itertuples():
        t0 = time.perf_counter()
        y, in_sr = audio.read_audio(resolve_path(r.path, raw_dir))
        t1 = time.perf_counter()
        y = audio.resample(audio.to_mono(y), in_sr, sr)
        t2 = time.perf_counter()
        spec = log_mel(y, sr, f)
        t3 = time.perf_counter()
        delta(delta(spec, f["delta_n"]), f["delta_n"])
        t4 = time.perf_counter()
        d1 = librosa.feature.delta(spec.T, width=2 * f["delta_n"] + 1)
        librosa.feature.delta(d1, width=2 * f["delta_n"] + 1)
        t5 = time.perf_counter()
        for key, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            split[key] += dt
    split["utterances"] = len(kept)
    split["audio_s"] = float(kept["duration"].sum())
    return split


def main(argv: list[str] | None = None) -> None:
    """The job of one fresh process: its result as one ``@@``-marked JSON line on stdout."""
    from mdser.corpora import read_manifest
    from mdser.params import load_params

    parser = argparse.ArgumentParser(prog="python -m mdser.bench.features",
                                     description="One timed feature-extraction job.")
    parser.add_argument("kind", choices=["repo", "librosa"])
    parser.add_argument("manifest_csv", type=Path)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("work", type=Path, nargs="?", help="output folder (repo job only)")
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    manifest = read_manifest(args.manifest_csv)
    if args.kind == "repo":
        result = repo_features(params, manifest, args.raw_dir, args.work)
    else:
        result = librosa_loop(params, manifest, args.raw_dir)
    print_result(result)


if __name__ == "__main__":
    main()
