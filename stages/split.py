"""DVC stage `split`: speaker-independent folds (test, validation, training speakers).

    python stages/split.py data/manifest.csv data/splits.json
"""

import argparse
from pathlib import Path

from mdser.corpora import class_names, read_manifest
from mdser.errors import run_stage
from mdser.params import load_params
from mdser.splits import speaker_folds, write_folds
from mdser.stores import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    data = load_params()["data"]

    manifest = read_manifest(args.manifest)
    folds = speaker_folds(manifest)
    kept = set(manifest.loc[manifest["status"] == "kept", "emotion"])
    classes = [c for c in class_names(data) if c in kept]
    write_folds(folds, sha256_file(args.manifest), args.out, classes)
    print(f"{len(folds)} speaker folds over {len(classes)} classes -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
