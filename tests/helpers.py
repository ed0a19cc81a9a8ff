"""What several test modules share, as plain functions: the tiny configuration, the
in-process fit loop on a tiny fold, and files in EMODB naming.

A normal module, not a test module (pytest collects `test_*.py` only): `tests/` is on the
import path through `pythonpath` in pyproject.toml, and a subprocess puts it there itself.
The fixtures built on these are in conftest.py; the helpers of real `dvc`/`mlflow` runs in a
copy of the repository are in repo_runs.py.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]

# --- the tiny configuration: the real params.yaml with a few keys shrunk ------------------------

# What makes a run of the pipeline tiny (seconds per stage on 2 CPU cores): a shorter built-in
# corpus, a narrow model, two folds of two epochs. Every other key is params.yaml's.
TINY = {
    "data": {"synth": {"utterances": 70}},
    "model": {"filters": 4, "attention_units": 8, "fc_units": 8},
    "train": {"folds": 2, "max_epochs": 2, "start_from_epoch": 0},
}


@functools.cache
def _read_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def repo_params() -> dict[str, Any]:
    """params.yaml as written (read once; a fresh copy per call)."""
    return copy.deepcopy(_read_params())


def merged(base: dict, *overrides: dict) -> dict:
    """`base` with each override applied in turn: nested sections merged key by key, any
    other value (lists included) replaced."""
    out = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def tiny_params(*overrides: dict, validate: bool = False) -> dict[str, Any]:
    """params.yaml shrunk by TINY, then by `overrides` (a test's own keys). With `validate`,
    checked by the params schema and returned as `mdser.params.load_params` returns it."""
    params = merged(repo_params(), TINY, *overrides)
    if validate:
        from mdser.params import Params

        params = Params.model_validate(params).model_dump()
    return params


def only_rows(params: dict, rows: list[str]) -> dict:
    """Keep the ablation rows `rows` and the steps between them (or from the baseline)."""
    ablation = params["ablation"]
    ablation["rows"] = {r: ablation["rows"][r] for r in rows}
    ablation["steps"] = {r: b for r, b in ablation["steps"].items()
                         if r in rows and (b in rows or b == "baseline")}
    return params


def trainer_config(model: dict | None = None, train: dict | None = None,
                   ) -> tuple[dict, dict, dict]:
    """`(model, train, head_params)` as `mdser.training.RowTrainer` takes them: the tiny
    configuration's sections with `model` and `train` over them, and the ArcFace margin at
    its full value from the first epoch (no warm-up)."""
    params = tiny_params({"model": model or {}, "train": train or {}, "arcface": {"margin_warmup": 0}})
    return params["model"], params["train"], params[params["model"]["head"]]


# --- the fit loop on a tiny in-memory fold (test_training and its subprocess) -------------------


def tiny_fold(seed: int = 0):
    """Frames of 3 classes (a class-dependent offset), 8 bands, and train/val members."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 60, 30)
    labels = np.arange(30) % 3
    frames = rng.standard_normal((lengths.sum(), 8, 3)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for o, n, y in zip(offsets, lengths, labels, strict=True):
        frames[o : o + n] += y
    rows = pd.DataFrame({"offset": offsets, "frames": lengths})
    members = {"train": rows.iloc[:24], "val": rows.iloc[24:]}
    return frames, members, {"train": labels[:24], "val": labels[24:]}


def fit(trainer, train: dict, fold: int, checkpoint=None):
    """`mdser.training.fit_fold` on `tiny_fold()`: (best weights, history, stats)."""
    from mdser.training import fit_fold

    frames, members, labels = tiny_fold()
    return fit_fold(trainer, train, frames, members, labels, 3, fold, "tiny", checkpoint)


def same(a, b) -> bool:
    """Two lists of arrays, element by element equal."""
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --- files in EMODB naming -----------------------------------------------------------------------

LETTERS = "WLEAFTN"


def utterance(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    """A voiced-sounding test signal (an amplitude-modulated tone and a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    y += 0.02 * rng.standard_normal(t.size)
    return np.stack([y, 0.5 * y], axis=1) if channels == 2 else y


def make_emodb(root: Path, speakers=("03", "08"), sr: int = 16000) -> list[Path]:
    """One 0.7 s utterance per (speaker, emotion letter) in EMODB naming."""
    (root / "wav").mkdir(parents=True)
    paths = []
    for i, spk in enumerate(speakers):
        for j, letter in enumerate(LETTERS):
            path = root / "wav" / f"{spk}a0{1 + j % 5}{letter}a.wav"
            sf.write(path, utterance(0.7, sr, seed=100 * i + j), sr, subtype="PCM_16")
            paths.append(path)
    return paths
