"""Ragged stores: one flat array of samples (or frames) plus an index.

A store is a few files however large the corpus is: `index.csv` (utt_id, speaker,
emotion, offset, length), `meta.json`, and the data, read by memory map. Stages
write a store into a temporary folder and rename it when complete, so an
interrupted run never leaves a store that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdser.console import progress_bar
from mdser.corpora.manifest import sha256_file
from mdser.errors import UserError

AUDIO_FILE = "audio.f32"  # raw little-endian float32 samples, mono
FEATURES_FILE = "features.npy"  # (total_frames, n_mels, 3) float32
INDEX_FILE = "index.csv"
UTTERANCES_PER_JOB = 32  # work handed to a worker process at a time
META_FILE = "meta.json"
# A trained fold's probabilities for its test speaker's utterances (utt_id, one column per class)
TEST_PROBABILITIES_FILE = "test_probabilities.csv"


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only on success."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_index(index: pd.DataFrame, path: Path) -> None:
    index.to_csv(path, index=False, lineterminator="\n")


def read_index(store: Path) -> pd.DataFrame:
    path = store / INDEX_FILE
    if not path.exists():
        raise UserError(f"{path}: missing; run the stage that builds {store}")
    return pd.read_csv(path, dtype={"utt_id": str, "speaker": str, "emotion": str})


def read_meta(store: Path) -> dict[str, Any]:
    return json.loads((store / META_FILE).read_text())


def write_meta(store: Path, meta: dict[str, Any]) -> None:
    (store / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def open_audio(store: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The audio store: its index and a read-only memory map of all samples."""
    index = read_index(store)
    samples = np.memmap(store / AUDIO_FILE, dtype="<f4", mode="r")
    expected = int(index["n_samples"].sum())
    if samples.size != expected:
        raise UserError(f"{store / AUDIO_FILE}: {samples.size} samples, index says {expected}")
    return index, samples


def open_features(store: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The feature store: its index and a read-only memory map of all frames."""
    index = read_index(store)
    frames = np.load(store / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
    expected = int(index["frames"].sum())
    recorded = read_meta(store).get("index_sha256")
    if recorded and sha256_file(store / INDEX_FILE) != recorded:
        raise UserError(
            f"{store / INDEX_FILE}: changed since the feature store was built (its checksum in "
            f"{store / META_FILE} differs); rebuild the features with `dvc repro featurize`"
        )
    if frames.shape[0] != expected:
        raise UserError(
            f"{store / FEATURES_FILE}: {frames.shape[0]} frames, but {store / INDEX_FILE} "
            f"says {expected}; the feature store is damaged, rebuild it with `dvc repro featurize`"
        )
    return index, frames


def open_fold_features(
    store: Path, folds_doc: dict[str, Any], n_folds: int
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """`open_features` of the store the folds were made from, its meta, and the first
    `n_folds` folds (`train.folds`); a store from another manifest or too few folds is an error."""
    index, frames = open_features(store)
    meta = read_meta(store)
    if meta.get("manifest_sha256") != folds_doc["manifest_sha256"]:
        raise UserError(
            f"{store} was built from a different manifest than the folds "
            f"({meta.get('manifest_sha256')} vs {folds_doc['manifest_sha256']}); run `dvc repro`"
        )
    folds = folds_doc["folds"]
    if n_folds > len(folds):
        raise UserError(f"train.folds = {n_folds}, but the corpus has only {len(folds)} folds")
    return index, frames, meta, folds[:n_folds]


def utterance(frames: np.ndarray, row: Any) -> np.ndarray:
    """One utterance's (frames, n_mels, 3) slice of the feature store."""
    return frames[int(row.offset) : int(row.offset) + int(row.frames)]


def _one_thread_per_worker() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # the workers already use every core; nested BLAS threads only fight


def parallel_map(fn: Any, jobs: Iterable[Any], workers: int | None = None) -> Iterator[Any]:
    """Ordered map over worker processes (one per core); plain map for one core."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread_per_worker) as pool:
        yield from pool.map(fn, jobs, chunksize=4)


def _resample_into_part(job: tuple[Path, list[tuple[Path, str]], int]) -> list[int]:
    """Verify, decode and resample some files into one part file; their sample counts.

    Workers write their audio to disk rather than send it back through a pipe
    (at a few hundred MB/s, the pipe was the slowest part of the stage)."""
    from mdser import audio

    part, files, target_sr = job
    lengths = []
    with open(part, "wb") as f:
        for path, sha256 in files:
            if sha256_file(path) != sha256:
                raise UserError(
                    f"{path}: its content changed since `download` recorded its checksum in the "
                    "manifest; restore the file or re-run `dvc repro download`"
                )
            y, sr = audio.read_audio(path)
            y = audio.resample(audio.to_mono(y), sr, target_sr).astype("<f4")
            f.write(y.tobytes())
            lengths.append(y.size)
    return lengths


def build_audio_store(manifest: pd.DataFrame, raw_dir: Path, out: Path, sample_rate: int) -> pd.DataFrame:
    """Every kept utterance, checksum-verified, as 16 kHz mono float32 in one file."""
    from mdser.corpora import resolve_path

    kept = manifest[manifest["status"] == "kept"].sort_values("utt_id")
    files = [(resolve_path(r.path, raw_dir), r.sha256) for r in kept.itertuples()]
    chunks = [files[i : i + UTTERANCES_PER_JOB] for i in range(0, len(files), UTTERANCES_PER_JOB)]
    parts = [out / f"{AUDIO_FILE}.part{k:06d}" for k in range(len(chunks))]
    jobs = zip(parts, chunks, [sample_rate] * len(chunks), strict=True)
    lengths: list[int] = []
    with open(out / AUDIO_FILE, "wb") as f, progress_bar("resample", len(files)) as bar:
        for part, part_lengths in zip(parts, parallel_map(_resample_into_part, jobs), strict=True):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f)
            part.unlink()
            lengths += part_lengths
            bar.update(len(part_lengths))
    index = kept[["utt_id", "speaker", "emotion"]].reset_index(drop=True)
    index["n_samples"] = np.asarray(lengths, dtype=np.int64)
    index["sample_offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    write_index(index, out / INDEX_FILE)
    return index


def tree_hash(*paths: Path) -> str:
    """A short content hash of files and folders (sorted walk), e.g. a stage's inputs."""
    digest = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in Path(top).rglob("*") if p.is_file()) if Path(top).is_dir() else [Path(top)]
        for f in files:
            digest.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()[:16]
