"""DVC stage `resample`: every kept utterance, checksum-verified, to 16 kHz mono.

    python stages/resample.py data/manifest.csv data/raw data/audio
"""

import argparse
from pathlib import Path

from mdser.corpora import read_manifest
from mdser.errors import run_stage
from mdser.params import load_params
from mdser.stores import atomic_dir, build_audio_store, sha256_file, write_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    sample_rate = load_params()["audio"]["sample_rate"]

    manifest = read_manifest(args.manifest)
    with atomic_dir(args.out) as out:
        index = build_audio_store(manifest, args.raw_dir, out, sample_rate)
        write_meta(out, {"sample_rate": sample_rate, "manifest_sha256": sha256_file(args.manifest)})
    hours = index["n_samples"].sum() / sample_rate / 3600
    print(f"{len(index)} utterances, {hours:.2f} h at {sample_rate} Hz -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
