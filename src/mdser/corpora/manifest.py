"""The corpus manifest: one row per audio file found, kept or dropped with a reason.

Readers build rows with `new_row`, then `check_audio` decodes every file once
(checksum, duration, sample rate, channels, bad-audio reasons, duplicates).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import soundfile as sf

from mdser.audio import AudioError, read_audio
from mdser.errors import UserError

COLUMNS = [
    "corpus", "utt_id", "path", "speaker", "gender", "session", "emotion",
    "duration", "sample_rate", "channels", "sha256", "status", "reason",
]
STR_COLUMNS = [
    "corpus", "utt_id", "path", "speaker", "gender", "session", "emotion",
    "sha256", "status", "reason",
]
KEPT, DROPPED = "kept", "dropped"

EMODB_CLASSES = ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]
IEMOCAP_CODES = {
    "neu": "neutral", "hap": "happiness", "sad": "sadness", "ang": "anger",
    "exc": "excitement", "fru": "frustration", "sur": "surprise", "fea": "fear",
    "dis": "disgust", "oth": "other", "xxx": "no_agreement",
}


def iemocap_class_names(iemocap: dict) -> list[str]:
    """Class names for `data.iemocap.classes` codes, in their order, without repeats."""
    names: list[str] = []
    for code in iemocap["classes"]:
        if code not in IEMOCAP_CODES:
            raise UserError(
                f"data.iemocap.classes: unknown IEMOCAP label {code!r}; "
                f"allowed: {sorted(IEMOCAP_CODES)}"
            )
        if IEMOCAP_CODES[code] not in names:
            names.append(IEMOCAP_CODES[code])
    if not names:
        raise UserError("data.iemocap.classes is empty: at least one class is needed")
    return names


def class_names(data: dict) -> list[str]:
    """Ordered class set of the corpus selected by `data` (the `data` params section)."""
    corpus = data["corpus"]
    if corpus == "emodb" or (corpus == "synth" and data["synth"].get("layout") == "emodb"):
        return list(EMODB_CLASSES)
    if corpus in ("iemocap", "synth"):
        return iemocap_class_names(data["iemocap"])
    raise UserError(f"data.corpus: unknown corpus {corpus!r}; allowed: synth, emodb, iemocap")


def new_row(corpus: str, utt_id: str, path: str, **fields: Any) -> dict:
    """A manifest row with defaults (kept, unknown audio properties) and `fields` set."""
    row = {
        "corpus": corpus, "utt_id": utt_id, "path": path, "speaker": "", "gender": "",
        "session": "", "emotion": "", "duration": 0.0, "sample_rate": 0, "channels": 0,
        "sha256": "", "status": KEPT, "reason": "",
    }
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row.update(fields)
    if row["reason"]:
        row["status"] = DROPPED
    return row


def drop(row: dict, reason: str) -> None:
    """Mark `row` dropped with `reason` unless it already has one (the first reason wins)."""
    if row["status"] == KEPT:
        row["status"], row["reason"] = DROPPED, reason


def manifest_path(path: Path, raw_dir: Path | None) -> str:
    """POSIX path relative to `raw_dir` when `path` lies under it, else absolute."""
    path = Path(os.path.abspath(path))
    if raw_dir is not None:
        try:
            return path.relative_to(Path(os.path.abspath(raw_dir))).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def resolve_path(path: str, raw_dir: Path) -> Path:
    """Inverse of `manifest_path`: the file a manifest `path` refers to."""
    p = Path(path)
    return p if p.is_absolute() else Path(raw_dir) / p


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_audio(rows: list[dict], raw_dir: Path | None, min_duration: float) -> pd.DataFrame:
    """Fill checksum and audio properties of every row; drop bad, short and duplicate audio.

    Reasons already set by the reader (naming, labels) come first; then
    unreadable/empty/nan/silent, then too_short, then duplicate (same
    sha256 as an earlier kept row in utt_id order).
    """
    rows = sorted(rows, key=lambda r: (r["utt_id"], r["path"]))
    seen_ids: set[str] = set()
    seen_sha: dict[str, str] = {}
    for row in rows:
        file = resolve_path(row["path"], raw_dir) if raw_dir else Path(row["path"])
        try:
            row["sha256"] = sha256_file(file)
            info = _probe(file)
            row.update(info)
            y, sr = read_audio(file)
            row["duration"] = round(y.shape[0] / sr, 6)
        except AudioError as exc:
            drop(row, exc.reason)
        except OSError:
            drop(row, "unreadable")
        if row["status"] == KEPT and row["duration"] < min_duration:
            drop(row, "too_short")
        if row["status"] == KEPT and row["utt_id"] in seen_ids:
            drop(row, "duplicate_id")
        if row["status"] == KEPT and row["sha256"] in seen_sha:
            drop(row, "duplicate")
        if row["status"] == KEPT:
            seen_ids.add(row["utt_id"])
            seen_sha[row["sha256"]] = row["utt_id"]
    df = pd.DataFrame(rows, columns=COLUMNS)
    return _typed(df)


def _probe(file: Path) -> dict:
    """Sample rate, channels and header duration, or {} when the header is unreadable."""
    try:
        info = sf.info(str(file))
    except (RuntimeError, OSError, ValueError):  # read_audio says why
        return {}
    return {
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "duration": round(info.frames / info.samplerate, 6) if info.samplerate else 0.0,
    }


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Column dtypes of a manifest: str, float duration, int rate and channels."""
    df = df.copy()
    for col in STR_COLUMNS:
        df[col] = df[col].fillna("").astype(str)
    df["duration"] = pd.to_numeric(df["duration"]).astype(float).round(6)
    df["sample_rate"] = pd.to_numeric(df["sample_rate"]).astype(int)
    df["channels"] = pd.to_numeric(df["channels"]).astype(int)
    return df


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write a manifest CSV atomically, sorted by utt_id, with deterministic formatting."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    df = _typed(df[COLUMNS]).sort_values(["utt_id", "path"], kind="mergesort")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            df.to_csv(f, index=False, lineterminator="\n", float_format="%.6f")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest CSV with ids as strings ("03" stays "03")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found (run the download stage first)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable manifest CSV ({exc})") from exc
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: manifest lacks columns {missing}; expected {COLUMNS}")
    try:
        return _typed(df[COLUMNS])
    except ValueError as exc:
        raise UserError(f"{path}: bad numeric value in manifest ({exc})") from exc


def corpus_counts(df: pd.DataFrame) -> dict:
    """Counts for metrics/corpus.json: totals, drops by reason, kept per emotion and speaker."""
    kept = df[df["status"] == KEPT]
    dropped = df[df["status"] != KEPT]

    def counts(series: pd.Series) -> dict[str, int]:
        return {str(k): int(v) for k, v in sorted(series.value_counts().items())}

    return {
        "files": int(len(df)),
        "kept": int(len(kept)),
        "dropped": int(len(dropped)),
        "dropped_by_reason": counts(dropped["reason"]),
        "kept_by_emotion": counts(kept["emotion"]),
        "kept_by_speaker": counts(kept["speaker"]),
        "kept_hours": round(float(kept["duration"].sum()) / 3600.0, 4),
    }
