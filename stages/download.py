"""DVC stage `download`: the corpus into data/raw, and a manifest of every file found.

    python stages/download.py data/raw data/manifest.csv metrics/corpus.json
"""

import argparse
import json
from pathlib import Path

from mdser.corpora import corpus_counts, prepare, write_manifest
from mdser.errors import run_stage
from mdser.params import load_params
from mdser.runtime import main_repo_root
from mdser.stores import atomic_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("counts", type=Path)
    args = parser.parse_args()
    data = load_params()["data"]

    with atomic_dir(args.raw_dir) as raw_dir:
        manifest, info = prepare(data, raw_dir, cache_dir=main_repo_root() / ".cache" / "downloads")
    write_manifest(manifest, args.manifest)
    counts = corpus_counts(manifest) | info
    args.counts.parent.mkdir(parents=True, exist_ok=True)
    args.counts.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    kept = int((manifest["status"] == "kept").sum())
    print(f"{data['corpus']}: {len(manifest)} files found, {kept} kept -> {args.manifest}")


if __name__ == "__main__":
    run_stage(main)
