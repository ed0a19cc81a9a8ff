"""Berlin Emotional Speech Database (EMODB): labels and speakers from the file names.

`03a01Fa.wav` = speaker "03", text "a01", emotion letter "F" (Freude), version "a".
The built-in corpus writes the same layout, so this reader serves both.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from mdser.corpora.manifest import check_audio, manifest_path, new_row
from mdser.errors import UserError

EMOTION_LETTERS = {
    "W": "anger",      # Ärger (Wut)
    "L": "boredom",    # Langeweile
    "E": "disgust",    # Ekel
    "A": "fear",       # Angst
    "F": "happiness",  # Freude
    "T": "sadness",    # Trauer
    "N": "neutral",
}
# Documented speakers of EMODB (erklaerung.txt): gender m/f.
SPEAKER_GENDERS = {
    "03": "m", "08": "f", "09": "f", "10": "m", "11": "m",
    "12": "m", "13": "f", "14": "f", "15": "m", "16": "f",
}
NAME_RE = re.compile(
    r"^(?P<speaker>\d{2})(?P<text>[a-z]\d{2})(?P<emotion>[A-Z])(?P<version>[a-z])$"
)


def parse_name(stem: str) -> dict | None:
    """Speaker, text, emotion letter and version of an EMODB file stem, or None."""
    m = NAME_RE.match(stem)
    return m.groupdict() if m else None


def speaker_genders(raw_dir: Path) -> dict[str, str]:
    """Genders from `raw_dir/speakers.csv` (written by the built-in corpus) or EMODB's table."""
    table = Path(raw_dir) / "speakers.csv"
    if not table.is_file():
        return dict(SPEAKER_GENDERS)
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"speaker", "gender"} <= set(reader.fieldnames):
            raise UserError(f"{table}: needs columns 'speaker' and 'gender'")
        return {row["speaker"]: row["gender"] for row in reader}


def find_wav_dir(root: Path) -> Path:
    """`root/wav`, the one `*/wav` below it (archives with a top folder), or `root` itself
    when it holds the .wav files."""
    root = Path(root)
    if (root / "wav").is_dir():
        return root / "wav"
    found = sorted(p for p in root.glob("*/wav") if p.is_dir() and p.parent.name[0] != ".")
    if len(found) == 1:
        return found[0]
    if not found and root.is_dir() and list_wavs(root):
        return root
    raise UserError(
        f"{root}: no 'wav' folder of EMODB files found"
        + (f" (several candidates: {[str(p) for p in found]})" if found else "")
    )


def list_wavs(folder: Path) -> list[Path]:
    """Sorted *.wav files of a folder (any case), without hidden/AppleDouble `._` files."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.suffix.lower() == ".wav" and not p.name.startswith(".") and p.is_file()
    )


def read_emodb(root: Path, corpus: str, min_duration: float,
               raw_dir: Path | None = None) -> pd.DataFrame:
    """Manifest rows for every *.wav of `find_wav_dir(root)` (sorted), audio checked. Paths
    are relative to `raw_dir` (default `root`) when under it, else absolute (a copy read in
    place)."""
    root = Path(root)
    raw_dir = root if raw_dir is None else Path(raw_dir)
    wav_dir = find_wav_dir(root)
    genders = speaker_genders(root)
    rows = []
    for wav in list_wavs(wav_dir):
        path = manifest_path(wav, raw_dir)
        parts = parse_name(wav.stem)
        if parts is None:
            rows.append(new_row(corpus, wav.stem, path, reason="bad_file_name"))
            continue
        emotion = EMOTION_LETTERS.get(parts["emotion"], "")
        rows.append(new_row(
            corpus, wav.stem, path,
            speaker=parts["speaker"],
            gender=genders.get(parts["speaker"], ""),
            emotion=emotion,
            reason="" if emotion else "unknown_emotion_code",
        ))
    if not rows:
        raise UserError(f"{wav_dir}: no .wav files")
    return check_audio(rows, raw_dir, min_duration)
