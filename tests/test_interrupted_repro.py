"""Resuming an interrupted `dvc repro`: kills (SIGINT, SIGTERM, SIGKILL to the process group)
at five points of a real run, each reached deterministically (the run is frozen with SIGSTOP
at the kill point; for the MLflow kill the stage freezes itself through a test-only
`sitecustomize`), then the run taken to its end.

A killed stage is never taken as complete, training resumes from the completed fold and
epoch, MLflow is left with one finished run per row and no dangling one, and the tables
equal those of the uninterrupted reference run `base` (conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from repo_runs import (
    ROW,
    commit_all,
    edit_params,
    env_for,
    fresh_repo,
    local_uri,
    lock_stages,
    mlflow_runs,
    partials,
    sh,
    table_files,
)

# --- kills at chosen points of a run --------------------------------------------------------------


def completed_folds(repo: Path) -> list[Path]:
    resume = repo / ".cache" / "resume" / ROW
    if not resume.is_dir():
        return []
    return sorted(d for d in resume.iterdir() if not d.name.endswith(".partial")
                  and (d / "fold.json").exists())


KEPT_MARK = "kept-by-test"  # put into a completed fold's resume folder after a kill


def epoch_checkpoints(repo: Path) -> list[Path]:
    return sorted((repo / ".cache" / "resume" / ROW).glob("*.epoch-b*.npz"))


def _default_sigint() -> None:
    # a background job of a shell (`pytest &`) inherits SIGINT ignored, and so would every
    # stage: give the run the disposition a user's terminal gives it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(repo: Path, log: Path, extra: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(["dvc", "repro"], cwd=repo, env=env_for(repo, extra), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_default_sigint)


def kill_when(repo: Path, point: str, ready: Callable[[], bool], sig: signal.Signals,
              extra: dict[str, str] | None = None) -> dict:
    """Start `dvc repro`, wait until `ready()`, send `sig` to its process group."""
    log = repo.parent / f"{repo.name}-{point}.log"
    proc = _start(repo, log, extra)
    deadline = time.time() + 600
    while True:
        if ready():
            # freeze the run so that a fast stage cannot finish between the check and the
            # signal (featurize takes well under a second on the test corpus)
            os.killpg(proc.pid, signal.SIGSTOP)
            if ready():
                break
            os.killpg(proc.pid, signal.SIGCONT)
        if proc.poll() is not None:
            raise AssertionError(f"{point}: dvc repro ended ({proc.returncode}) before the "
                                 f"kill point:\n{log.read_text()}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{point}: kill point never reached:\n{log.read_text()}")
        time.sleep(0.005)
    os.killpg(proc.pid, sig)
    os.killpg(proc.pid, signal.SIGCONT)  # the signal is delivered as the run resumes
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        msg = f"{point}: dvc repro did not stop within 120 s of {sig.name}"
        raise AssertionError(msg) from None
    time.sleep(0.5)  # let killed grandchildren (pool workers) go
    return {"point": point, "signal": sig.name, "rc": rc, "log": log.read_text()}


# A `sitecustomize` put on the import path of one `dvc repro` only (nothing in the library
# knows of it): when the stage script MDSER_TEST_FREEZE_IN has logged the artifact
# MDSER_TEST_FREEZE_AT to MLflow, it writes the marker file and stops itself with SIGSTOP.
# The kill then lands at that point of log_row every time (a parent run and a fold run
# RUNNING, the other folds not yet logged), however fast the logging is.
FREEZE_HOOK = textwrap.dedent("""
    import os
    if os.environ.get("MDSER_TEST_FREEZE_AT"):
        import importlib.abc, importlib.util, signal, sys

        class _FreezeAfterArtifact(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name != "mlflow.tracking.client":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                exec_module = spec.loader.exec_module

                def patched(module):
                    exec_module(module)
                    log_text = module.MlflowClient.log_text

                    def frozen_after(client, run_id, text, artifact_file):
                        log_text(client, run_id, text, artifact_file)
                        if (artifact_file == os.environ["MDSER_TEST_FREEZE_AT"] and
                                os.path.basename(sys.argv[0]) == os.environ["MDSER_TEST_FREEZE_IN"]):
                            with open(os.environ["MDSER_TEST_FREEZE_MARKER"], "w") as f:
                                f.write(str(os.getpid()))
                            os.kill(os.getpid(), signal.SIGSTOP)

                    module.MlflowClient.log_text = frozen_after

                spec.loader.exec_module = patched
                return spec

        sys.meta_path.insert(0, _FreezeAfterArtifact())
""")


def freeze_after_artifact(repo: Path, script: str, artifact: str) -> tuple[dict[str, str], Path]:
    """The environment of a `dvc repro` whose stage `script` freezes after logging
    `artifact`, and the marker file that says it did."""
    hook = repo.parent / f"{repo.name}-freeze-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FREEZE_HOOK)
    marker = hook / "frozen"
    marker.unlink(missing_ok=True)
    extra = {"PYTHONPATH": f"{hook}{os.pathsep}{repo / 'src'}",
             "MDSER_TEST_FREEZE_IN": script, "MDSER_TEST_FREEZE_AT": artifact,
             "MDSER_TEST_FREEZE_MARKER": str(marker)}
    return extra, marker


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """One fresh repository killed at five points of `dvc repro`, then run to the end."""
    repo = fresh_repo(tmp_path_factory.mktemp("interrupted") / "repo")
    if "runtime" in yaml.safe_load((repo / "params.yaml").read_text()):
        # one fold at a time (the library can train folds in parallel), so that "one fold
        # done, the next part-way" is a state every run passes through
        edit_params(repo, lambda p: p["runtime"].update(workers=1))
        commit_all(repo, "one fold worker")
    kills = []

    def kill(point: str, ready: Callable[[], bool], sig: signal.Signals, stage: str,
             out: str | None, extra: dict[str, str] | None = None) -> None:
        k = kill_when(repo, point, ready, sig, extra)
        k |= {"stage": stage, "locked": lock_stages(repo),
              "out_exists": out is not None and (repo / out).exists(),
              "partials": [str(p.relative_to(repo)) for p in partials(repo)]}
        kills.append(k)

    kill("download", lambda: len(list((repo / "data/raw.partial").rglob("*.wav"))) >= 5,
         signal.SIGTERM, "download", "data/raw")
    kill("resample", lambda: (repo / "data/audio.partial").exists(), signal.SIGKILL, "resample",
         "data/audio")
    kill("featurize", lambda: (repo / "data/features.partial").exists(), signal.SIGINT,
         "featurize", "data/features")
    kill("train, 2nd fold after its 1st epoch",
         lambda: len(completed_folds(repo)) == 1 and bool(epoch_checkpoints(repo)),
         signal.SIGTERM, f"train@{ROW}", f"models/{ROW}")
    done = completed_folds(repo)[0]  # the run is dead: mark the fold it completed
    (done / KEPT_MARK).write_text("written by the test after the kill\n")
    done_fold = json.loads((done / "fold.json").read_text())["fold"]
    # frozen by FREEZE_HOOK right after the row's fold 0 predictions reached MLflow (ablate
    # logs the CNN row first, then the baseline): the parent run and fold 0's run are
    # RUNNING, fold 1 is not logged yet
    frozen, marker = freeze_after_artifact(repo, "ablate.py", "predictions.csv")
    kill("ablate, MLflow logging", marker.exists, signal.SIGKILL, "ablate", None, frozen)
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        running = db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
    final = sh(["dvc", "repro"], repo)
    return {"repo": repo, "kills": kills, "done_fold": done_fold, "final": final,
            "running_after_kill": running}


@pytest.mark.slow
def test_killed_stage_is_never_taken_as_complete(interrupted):
    for k in interrupted["kills"]:
        assert k["stage"] not in k["locked"], f"killed during {k['point']}, yet dvc.lock has it"
        assert not k["out_exists"], f"killed during {k['point']}, yet its output exists"
        assert k["rc"] != 0
    print(f"{len(interrupted['kills'])} interruption points:")
    for k in interrupted["kills"]:
        left = k["partials"] or "nothing"
        print(f"  {k['point']} ({k['signal']}): dvc exit {k['rc']}, left {left}")


@pytest.mark.slow
def test_rerun_after_kills_gives_the_uninterrupted_tables(interrupted, base):
    repo = interrupted["repo"]
    assert table_files(repo) == table_files(base)
    assert not partials(repo), partials(repo)
    assert sh(["dvc", "status", "--json"], repo).stdout.strip() == "{}"


@pytest.mark.slow
def test_training_resumes_from_the_completed_fold_and_epoch(interrupted):
    repo, done = interrupted["repo"], interrupted["done_fold"]
    part_way = 1 - done  # the run trains folds 0 and 1
    models = repo / "models" / ROW
    # the fold completed before the kill was taken as it was (its folder, with the test's
    # mark, copied into the output), not trained again; the other fold was trained after it
    assert (models / f"fold_{done}" / KEPT_MARK).is_file()
    assert (models / f"fold_{part_way}" / "fold.json").is_file()
    assert not (models / f"fold_{part_way}" / KEPT_MARK).exists()
    after_kill = next(k for k in interrupted["kills"] if k["point"].startswith("ablate"))
    log = after_kill["log"]  # the next repro: the part-way fold went on after its last epoch
    assert re.search(rf"row {ROW}, fold {part_way}: resuming after epoch \d+", log), log[-3000:]
    assert f"fold {done}: resuming" not in log
    assert not list((repo / ".cache" / "resume" / ROW).glob("*.partial"))
    assert not epoch_checkpoints(repo)  # a finished fold keeps only its result


@pytest.mark.slow
def test_killed_mlflow_logging_leaves_one_finished_run_per_row(interrupted):
    runs = mlflow_runs(local_uri(interrupted["repo"]))
    parents = [r for r in runs if r.data.tags.get("level") == "row"]
    finished = [r for r in parents if r.info.status == "FINISHED"]
    per_row = Counter(r.data.tags["row"] for r in finished)  # the CNN row (and the baseline)
    assert per_row[ROW] == 1 and set(per_row.values()) == {1}, per_row
    for parent in finished:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["fold"] for r in children) == ["0", "1"]
        assert all(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_killed_mlflow_logging_leaves_no_dangling_run(interrupted):
    # the kill left the parent run and fold 0's run RUNNING (see FREEZE_HOOK) ...
    assert interrupted["running_after_kill"] == 2, interrupted["running_after_kill"]
    # ... and the rerun's log_results closed them (KILLED) before logging the row again
    runs = mlflow_runs(local_uri(interrupted["repo"]))
    dangling = [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"]
    assert not dangling, dangling
    killed = sorted(r.info.run_name for r in runs if r.info.status == "KILLED")
    assert killed == sorted([ROW, f"{ROW}/fold0"]), killed
