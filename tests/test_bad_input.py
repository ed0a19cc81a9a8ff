"""Bad input, refused with one clear `error:` line (no traceback) and no output written.

Faults injected into REAL runs in a temporary copy of the repository (repo_runs.fresh_repo:
the tiny configuration, one ArcFace ablation row): bad parameters (refused by the `check`
stage before DVC deletes any output, or by the stage script itself), more folds than
speakers, a learning rate that makes the loss NaN, a corpus file changed after `download`,
a damaged feature store. Nothing of DVC is mocked; the runs after `download` start from
the shared reference run `base` (conftest.py).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from repo_runs import (
    ROW,
    TRACEBACK,
    clone,
    edit_params,
    error_lines,
    fresh_repo,
    local_uri,
    lock_stages,
    mlflow_runs,
    partials,
    sh,
)

# --- parameters checked before any work -----------------------------------------------------------


def _rename(section: str, old: str, new: str) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p[section][new] = p[section].pop(old)
    return mutate


BAD_PARAMS = [
    # (name, mutation, substrings the single error must show: key and value)
    ("misspelt key", _rename("train", "max_epochs", "max_epoch"), ["train.max_epoch ", "= 2"]),
    ("wrong type", lambda p: p["train"].update(batch_frames="lots"),
     ["train.batch_frames", "'lots'"]),
    ("arcface margin >= pi", lambda p: p["arcface"].update(m=3.5), ["arcface.m", "3.5"]),
    ("arcface scale 0", lambda p: p["arcface"].update(s=0), ["arcface.s", "= 0"]),
    ("spp level 25", lambda p: p["ablation"]["rows"][ROW].update(spp_levels=[1, 25]),
     [f"ablation.rows.{ROW}.spp_levels", "[1, 25]"]),
    ("empty class set", lambda p: p["data"]["iemocap"].update(classes=[]),
     ["data.iemocap.classes", "[]"]),
    ("iemocap root missing",
     lambda p: p["data"].update(corpus="iemocap") or p["data"]["iemocap"].update(
         root="/nonexistent/IEMOCAP_full_release"),
     ["data.iemocap.root", "/nonexistent/IEMOCAP_full_release"]),
    ("unknown corpus", lambda p: p["data"].update(corpus="ravdess"), ["data.corpus", "'ravdess'"]),
    ("lr_min > lr_max", lambda p: p["train"].update(lr_min=0.5, lr_max=0.1),
     ["train.lr_min", "0.5"]),
    ("negative filters", lambda p: p["model"].update(filters=-4), ["model.filters", "-4"]),
    ("misspelt row key", lambda p: p["ablation"]["rows"][ROW].update(atention=True),
     [f"ablation.rows.{ROW}.atention", "True"]),
]


STAGE_CMDS = {  # each stage's command in dvc.yaml, for the one row
    "download": "stages/download.py data/raw data/manifest.csv metrics/corpus.json",
    "resample": "stages/resample.py data/manifest.csv data/raw data/audio",
    "featurize": "stages/featurize.py data/audio data/features",
    "split": "stages/split.py data/manifest.csv data/splits.json",
    "train": f"stages/train.py {ROW} data/features data/splits.json models/{ROW}",
    "evaluate": f"stages/evaluate.py {ROW} data/features data/splits.json models/{ROW} "
                f"results/{ROW} metrics/rows/{ROW}.json",
    "ablate": "stages/ablate.py results metrics",
}


def _how(i: int) -> list[str]:
    """Every third case through `dvc repro`, the others through one stage script each."""
    if i % 3 == 0:
        return ["dvc", "repro"]
    stage = list(STAGE_CMDS)[i % len(STAGE_CMDS)]
    return [sys.executable, *STAGE_CMDS[stage].split()]


def _bad_params_case(tmp: Path, i: int) -> str:
    """Run with one bad value; return "" or what went wrong."""
    name, mutate, shown = BAD_PARAMS[i]
    repo = fresh_repo(tmp / re.sub(r"\W+", "_", name))
    edit_params(repo, mutate)
    cmd = _how(i)
    proc = sh(cmd, repo, check=False)
    problems = []
    if proc.returncode == 0:
        problems.append(f"{' '.join(cmd[:2])} succeeded")
    errors = error_lines(proc.stderr)
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' messages")
    for s in shown:
        if s not in proc.stderr:
            problems.append(f"{s!r} not in the message")
    if TRACEBACK in proc.stderr:
        problems.append("a Python traceback")
    for out in ("data", "models", "results", "metrics", "mlruns", ".cache"):
        if (repo / out).exists():
            problems.append(f"{out}/ was written")
    return f"{name} ({' '.join(cmd[:2])}): {'; '.join(problems)}\n{proc.stderr}" if problems else ""


@pytest.mark.slow
def test_bad_parameters_stop_every_stage_before_any_work(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        failures = list(pool.map(lambda i: _bad_params_case(tmp_path, i), range(len(BAD_PARAMS))))
    ways = Counter(Path(_how(i)[1]).stem for i in range(len(BAD_PARAMS)))
    print(f"{len(BAD_PARAMS)} bad parameter values tried: {dict(ways)}")
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)


@pytest.mark.slow
def test_more_folds_than_speakers_is_refused_before_any_work(tmp_path):
    repo = fresh_repo(tmp_path / "r")
    edit_params(repo, lambda p: p["train"].update(folds=50))
    proc = sh(["dvc", "repro", "download"], repo, check=False)
    assert proc.returncode != 0, "download ran although train.folds = 50 > 10 speakers"
    assert "train.folds" in proc.stderr and "50" in proc.stderr
    assert not (repo / "data").exists()


def _tree_bytes(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


@pytest.mark.slow
def test_a_bad_parameter_stops_dvc_repro_in_check_and_keeps_earlier_outputs(tmp_path):
    """DVC deletes a stage's outputs before running it: the `check` stage (all of params.yaml;
    every stage depends on its output) refuses the value before DVC starts `download`."""
    repo = fresh_repo(tmp_path / "r")
    sh(["dvc", "repro", "split"], repo)  # check, download, split: the cheap stages
    kept = ["data/raw", "data/manifest.csv", "metrics/corpus.json", "data/splits.json", "dvc.lock"]
    before = {p: _tree_bytes(repo / p) for p in kept}
    assert before["data/raw"] and "check" in lock_stages(repo)

    edit_params(repo, lambda p: p["data"].update(corpus="emodbx"))
    proc = sh(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0, proc.stdout
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "data.corpus" in proc.stderr and "'emodbx'" in proc.stderr, proc.stderr
    assert TRACEBACK not in proc.stderr
    ran = re.findall(r"Running stage '([^']+)'", proc.stdout)
    assert ran == ["check"], ran  # DVC touched no other stage
    for p in kept:  # download's outputs and metrics, split's, and dvc.lock: as they were
        assert _tree_bytes(repo / p) == before[p], f"{p} changed or was deleted"
    assert not partials(repo)

    edit_params(repo, lambda p: p["data"].update(corpus="synth"))  # the value put right
    proc = sh(["dvc", "repro", "split"], repo)
    assert set(re.findall(r"Running stage '([^']+)'", proc.stdout)) <= {"check"}, proc.stdout
    for p in kept[:-1]:  # nothing after `check` re-ran: its output is the same file again
        assert _tree_bytes(repo / p) == before[p], f"{p} changed"


# --- more folds than speakers, at the train stage -------------------------------------------------


@pytest.mark.slow
def test_more_folds_than_speakers_is_a_clear_error_of_train(base, tmp_path):
    repo = clone(base, tmp_path / "r")
    edit_params(repo, lambda p: p["train"].update(folds=50))
    proc = sh(["dvc", "repro", "-s", f"train@{ROW}"], repo, check=False)
    assert proc.returncode != 0
    # refused by the params schema when the stage starts (train's own check is the backstop)
    assert len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "train.folds = 50" in proc.stderr and "at most 10" in proc.stderr, proc.stderr
    assert TRACEBACK not in proc.stderr
    assert not (repo / "models" / ROW).exists() and not partials(repo)


# --- a NaN loss -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nan_loss_stops_training_with_a_clear_error_and_a_failed_run(base, tmp_path):
    repo = clone(base, tmp_path / "r")
    for out in ("models", "results"):
        shutil.rmtree(repo / out / ROW)
    for s in ("md", "csv", "json"):
        (repo / f"metrics/ablation.{s}").unlink()
    edit_params(repo, lambda p: p["train"].update(lr_policy="fixed", lr_min=1e30, lr_max=1e30))
    proc = sh(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0, proc.stdout
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    named = rf"row {ROW}, fold 0, epoch \d+: training loss is (nan|inf|-inf)"
    assert re.search(named, errors[0]), errors
    assert TRACEBACK not in proc.stderr
    assert not (repo / "models" / ROW).exists() and not partials(repo)
    assert not (repo / "results" / ROW).exists() and not (repo / "metrics/ablation.md").exists()
    runs = mlflow_runs(local_uri(repo))
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    tags = failed[0].data.tags
    assert tags["row"] == ROW and tags["fold"] == "0" and "epoch" in tags["error"]


# --- damaged data ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_corpus_file_changed_after_download_fails_resample(base, tmp_path):
    repo = clone(base, tmp_path / "r")
    manifest = pd.read_csv(repo / "data/manifest.csv", dtype=str)
    victim = manifest[manifest["status"] == "kept"].iloc[3]["path"]
    path = repo / "data/raw" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one sample: still a valid wav
    path.write_bytes(bytes(data))
    proc = sh(["dvc", "repro", "-s", "resample"], repo, check=False)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert Path(victim).name in errors[0] and "changed" in errors[0], proc.stderr
    assert TRACEBACK not in proc.stderr
    assert not (repo / "data/audio").exists() and not partials(repo)
    assert "resample" in lock_stages(repo)  # the old lock entry stays: DVC sees it changed
    assert "resample" in sh(["dvc", "status", "--json"], repo).stdout


def damage_index(repo: Path, change: Callable[[pd.DataFrame], None]) -> None:
    path = repo / "data/features/index.csv"
    index = pd.read_csv(path, dtype={"utt_id": str, "speaker": str, "emotion": str})
    change(index)
    index.to_csv(path, index=False, lineterminator="\n")


@pytest.mark.slow
def test_a_damaged_feature_store_is_refused_by_train(base, tmp_path):
    repo = clone(base, tmp_path / "r")

    def grow(ix: pd.DataFrame) -> None:  # one utterance claims 7 frames more than the data holds
        ix.loc[0, "frames"] += 7

    damage_index(repo, grow)
    proc = sh(["dvc", "repro", "-s", f"train@{ROW}"], repo, check=False)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr  # names the store's file and how to rebuild it
    assert "data/features/" in errors[0] and "dvc repro featurize" in errors[0], errors
    assert TRACEBACK not in proc.stderr
    assert not (repo / "models" / ROW).exists() and not partials(repo)


@pytest.mark.slow  # needs the reference run `base`
def test_a_feature_index_with_shuffled_frame_counts_is_refused(base, tmp_path):
    from mdser.errors import UserError
    from mdser.stores import open_features

    repo = clone(base, tmp_path / "r")

    def shift(ix: pd.DataFrame) -> None:  # same total, different boundaries
        ix.loc[0, "frames"] += 5
        ix.loc[1, "frames"] -= 5

    damage_index(repo, shift)
    with pytest.raises(UserError, match="features"):
        open_features(repo / "data/features")
