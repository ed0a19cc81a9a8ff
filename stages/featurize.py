"""DVC stage `featurize`: 3-channel log-mel (paper Eq. 3-6) into one ragged feature store.

    python stages/featurize.py data/audio data/features
"""

import argparse
from pathlib import Path

from mdser.errors import run_stage
from mdser.features import build_feature_store
from mdser.params import load_params
from mdser.stores import atomic_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("audio", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    features = load_params()["features"]

    with atomic_dir(args.out) as out:
        index = build_feature_store(args.audio, out, features)
    print(f"{len(index)} utterances, {index['frames'].sum()} frames -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
