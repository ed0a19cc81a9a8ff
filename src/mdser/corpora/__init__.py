"""Corpora: the built-in synthetic corpus, EMODB (downloaded) and IEMOCAP (local).

`prepare` is the single entry point of the `download` stage: it produces the
manifest (one row per audio file found, kept or dropped with a reason).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mdser.corpora.download import fetch_archive, normalize_sha256, safe_extract_zip
from mdser.corpora.emodb import read_emodb
from mdser.corpora.iemocap import read_iemocap
from mdser.corpora.manifest import (
    COLUMNS,
    KEPT,
    class_names,
    corpus_counts,
    read_manifest,
    resolve_path,
    write_manifest,
)
from mdser.errors import UserError

__all__ = [
    "COLUMNS", "class_names", "corpus_counts", "prepare", "read_manifest",
    "resolve_path", "write_manifest",
]
log = logging.getLogger(__name__)


def prepare(
    data: dict, raw_dir: Path, cache_dir: Path | None = None
) -> tuple[pd.DataFrame, dict]:
    """Build the manifest of the corpus `data["corpus"]` (the `data` params section).

    synth: generate into raw_dir and read it back with the real reader of its
    layout; emodb: read in place from data.emodb.root when set, else download
    (checked) and extract into raw_dir, then read; iemocap: read in place from
    data.iemocap.root. Returns (manifest, info); info holds e.g. the archive's
    sha256 and reader warnings. The EMODB archive is kept in `cache_dir` (default
    raw_dir/archive) and reused when it verifies. Raises UserError if nothing is
    kept or a class of the class set has no kept utterance.
    """
    raw_dir = Path(raw_dir)
    corpus = data["corpus"]
    min_duration = float(data["min_duration"])
    info: dict = {"corpus": corpus}
    if corpus == "synth":
        from mdser.corpora.synth import generate  # scipy: imported only when needed

        generate(raw_dir, data["synth"])
        if data["synth"]["layout"] == "emodb":
            df = read_emodb(raw_dir, "synth", min_duration)
        else:
            df = read_iemocap(raw_dir / "IEMOCAP_full_release", data, raw_dir)
    elif corpus == "emodb" and data["emodb"]["root"]:
        root = Path(data["emodb"]["root"])
        info["root"] = str(root)
        df = read_emodb(root, "emodb", min_duration, raw_dir)
    elif corpus == "emodb":
        url, expected = data["emodb"]["url"], normalize_sha256(data["emodb"]["sha256"])
        archive, actual = fetch_archive(url, expected, Path(cache_dir or raw_dir / "archive"))
        info.update(archive_url=url, archive_sha256=actual, sha256_verified=bool(expected))
        if not expected:
            notice = (
                f"data.emodb.sha256 is empty: the archive from {url} was not verified; "
                f"its sha256 is {actual} (recorded here; set data.emodb.sha256 to pin it)"
            )
            log.warning(notice)
            info["notice"] = notice
        safe_extract_zip(archive, raw_dir)
        df = read_emodb(raw_dir, "emodb", min_duration)
    else:  # iemocap (the schema allows these three)
        df = read_iemocap(Path(data["iemocap"]["root"]), data, raw_dir)
    info["warnings"] = list(df.attrs.get("warnings", []))
    check_coverage(df, class_names(data))
    return df, info


def check_coverage(df: pd.DataFrame, classes: list[str]) -> None:
    """UserError with counts if nothing is kept or a class has no kept utterance."""
    counts = corpus_counts(df)
    kept = df[df["status"] == KEPT]
    if kept.empty:
        raise UserError(
            f"no utterance kept out of {counts['files']} files; dropped by reason: "
            f"{counts['dropped_by_reason']}"
        )
    empty = [c for c in classes if c not in set(kept["emotion"])]
    if empty:
        raise UserError(
            f"classes {empty} have no kept utterance; kept per class: "
            f"{counts['kept_by_emotion']}; dropped by reason: {counts['dropped_by_reason']}"
        )
