"""Concurrent MLflow logging: the local store's lock, and two experiments queued with
`dvc exp run --queue` and run by `dvc queue start -j 2` at once, logging to the local store
(the workers race to create it) and to a real `mlflow server` on 127.0.0.1 (conftest.py).
Every run is logged exactly once, with its artifacts, and no credential is written.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT
from repo_runs import ROW, clone, env_for, leaked_files, local_uri, mlflow_runs, sh, with_credentials

# --- the local store's lock -----------------------------------------------------------------------


LOCK_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from filelock import FileLock, Timeout
    os.chdir(sys.argv[1])
    from mdser import tracking
    tracking.client()  # what log_results does first
    with tracking.store_lock():
        try:
            FileLock(str(Path(sys.argv[1]) / "mlruns" / ".lock"), timeout=0.5).acquire()
            print("unlocked")
        except Timeout:
            print("locked")
    mlflow_client = tracking.client()
    exp = tracking.experiment_id(mlflow_client, "probe")
    print(mlflow_client.get_experiment(exp).artifact_location)
""")


def test_local_store_lock_is_held(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(tmp_path)], env=env_for(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    locked, location = proc.stdout.splitlines()[-2:]
    assert locked == "locked", "store_lock() did not hold mlruns/.lock after client()"
    assert location == (tmp_path / "mlruns" / "artifacts" / "probe").as_uri()


# --- two queued experiments, two workers ----------------------------------------------------------


# What each case's two experiments vary. On the local store, arcface.s: each experiment
# trains the row again in its worker's copy, then logs it. On the server, the interval's
# confidence: only `evaluate`, `baseline` and `ablate` run, and each experiment must still log
# its own table (the same models, other intervals).
QUEUED = {"local": ("arcface.s", [3.0, 4.0]), "server": ("ablation.confidence", [0.8, 0.9])}


def start_queue(repo: Path, key: str, extra: dict[str, str] | None) -> None:
    """Queue one experiment per value of the case's parameter and start two workers."""
    name, values = QUEUED[key]
    for value in values:
        sh(["dvc", "exp", "run", "--queue", "-S", f"{name}={value}"], repo, extra=extra)
    sh(["dvc", "queue", "start", "-j", "2"], repo, extra=extra)


def queue_rows(repo: Path, extra: dict[str, str] | None) -> list[list[str]]:
    """`dvc queue status`: [task, name, ..., status] per experiment."""
    out = sh(["dvc", "queue", "status"], repo, extra=extra).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    return [r for r in rows if r and r[-1] in ("Queued", "Running", "Success", "Failed")]


def _failure_lines(log: str) -> str:
    """What a failed experiment's log says about the failure: its traceback and error lines."""
    at = log.rfind("Traceback")
    lines = [ln for ln in log.splitlines() if "rror" in ln]
    return (log[at:at + 6000] if at >= 0 else "") + "\n".join(lines[-20:])


def _finished(rows: list[list[str]]) -> bool:
    return len(rows) == 2 and all(r[-1] in ("Success", "Failed") for r in rows)


def _check_runs(runs: list, key: str) -> dict[str, int]:
    """Each experiment logged its whole table once: the row and the baseline, each run with
    the value of its own experiment."""
    parents = [r for r in runs if r.data.tags.get("level") == "row"]
    per_key = Counter((r.data.tags.get("dvc.exp_name"), r.data.tags["row"]) for r in parents)
    assert set(per_key.values()) == {1}, per_key  # none duplicated
    assert len(per_key) == 4, per_key  # none lost: 2 experiments x (the row, the baseline)
    assert {row for _, row in per_key} == {ROW, "baseline"}, per_key
    assert all(name for name, _ in per_key), "a parent run has no dvc.exp_name tag"
    row_runs = [r for r in parents if r.data.tags["row"] == ROW]
    name, values = QUEUED[key]
    if name == "arcface.s":
        assert sorted(float(r.data.params[name]) for r in row_runs) == values
    else:  # the same models: the 80 % interval lies inside the 90 % one
        narrow, wide = sorted(row_runs, key=lambda r: r.data.metrics["ua_ci_high"])
        assert wide.data.metrics["ua_ci_low"] < narrow.data.metrics["ua_ci_low"], name
    assert all(r.info.status == "FINISHED" for r in runs)
    for p in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert sorted(r.data.tags["fold"] for r in kids) == ["0", "1"]
    return {"parents": len(parents), "children": len(runs) - len(parents)}


@pytest.fixture(scope="module")
def queues(base, server, tmp_path_factory) -> dict[str, dict]:
    """Both cases at once: two experiments on two workers logging to the local store (no
    mlruns/ yet: the workers race to create it) and two more logging to the server (through
    a URI with credentials)."""
    top = tmp_path_factory.mktemp("queues")
    cases = {"local": (clone(base, top / "local"), None, None),
             "server": (clone(base, top / "server"),
                        {"MLFLOW_TRACKING_URI": with_credentials(server.uri)}, server.uri)}
    cases["local"] = (cases["local"][0], None, local_uri(cases["local"][0]))
    t0, results = time.time(), {}
    try:
        for key, (repo, extra, _) in cases.items():
            start_queue(repo, key, extra)
        pending = dict(cases)
        deadline = time.time() + 1200
        while pending and time.time() < deadline:
            time.sleep(5)
            for key, (repo, extra, _) in list(pending.items()):
                rows = queue_rows(repo, extra)
                if _finished(rows):
                    results[key] = {"rows": rows, "seconds": time.time() - t0}
                    del pending[key]
    finally:  # the workers stay up when the queue is empty: always stop them
        for repo, extra, _ in cases.values():
            sh(["dvc", "queue", "stop"], repo, check=False, extra=extra, timeout=120)
    for key, (repo, extra, uri) in cases.items():
        r = results.setdefault(key, {"rows": queue_rows(repo, extra), "seconds": None})
        r |= {"repo": repo, "uri": uri, "key": key}
        r["logs"] = {row[1]: _failure_lines(sh(["dvc", "queue", "logs", row[0]], repo,
                                               check=False, extra=extra).stdout)
                     for row in r["rows"] if row[-1] != "Success"}
        r["exp_names"] = sh(["dvc", "exp", "list", "--name-only"], repo, extra=extra).stdout.split()
        try:
            r["runs"] = mlflow_runs(uri)
        except Exception as exc:  # e.g. a store left half-created by the race
            r["runs"], r["logs"]["mlflow"] = [], repr(exc)
    return results


def _assert_queue_accounted(q: dict) -> None:
    """Both experiments succeeded; DVC and MLflow each hold every one of them exactly once."""
    assert _finished(q["rows"]), q["rows"]
    failed = [r for r in q["rows"] if r[-1] != "Success"]
    assert not failed, q["logs"]
    assert sorted(q["exp_names"]) == sorted(r[1] for r in q["rows"])
    counts = _check_runs(q["runs"], q["key"])
    assert {r.data.tags["dvc.exp_name"] for r in q["runs"]} == set(q["exp_names"])
    print(f"queue: 2 experiments on 2 workers, {q['seconds']:.0f} s, {counts}")


@pytest.mark.slow
def test_two_queued_experiments_log_every_run_once_to_the_local_store(queues):
    _assert_queue_accounted(queues["local"])


@pytest.mark.slow
def test_queued_runs_keep_their_artifacts_in_the_local_store(queues):
    q = queues["local"]
    assert q["runs"]
    for r in q["runs"]:
        path = Path(r.info.artifact_uri.removeprefix("file://"))
        assert path.is_relative_to(q["repo"] / "mlruns"), r.info.artifact_uri
        assert path.is_dir() and any(path.iterdir()), r.info.artifact_uri


@pytest.mark.slow
def test_two_queued_experiments_log_every_run_once_to_a_server(queues, server):
    from mlflow.tracking import MlflowClient

    q = queues["server"]
    _assert_queue_accounted(q)
    assert len(q["runs"]) == 12  # 2 experiments x 2 rows (the row, the baseline) x (1 + 2 folds)
    assert not (q["repo"] / "mlruns").exists()  # nothing went to a local store
    client = MlflowClient(server.uri)
    for r in q["runs"]:
        assert client.list_artifacts(r.info.run_id), r.info.run_name


@pytest.mark.slow
def test_queued_experiments_write_no_credentials(queues):
    leaks = leaked_files(queues["server"]["repo"])
    assert not leaks, leaks


def test_an_experiment_another_worker_created_meanwhile_is_used(tmp_path, monkeypatch):
    """Two queue workers logging to one server both see no experiment and both create it;
    the second create fails on the store's unique name, and the worker uses the first's."""
    import mlflow

    from mdser.tracking import experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = experiment_id(real, "mdser-synth", tmp_path)

    class LateWorker(mlflow.MlflowClient):
        """Its lookup ran before the other worker's create (the race, made deterministic)."""

        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    late = LateWorker(tracking_uri=real.tracking_uri)
    assert experiment_id(late, "mdser-synth", tmp_path) == first
    assert len(real.search_experiments(filter_string="name = 'mdser-synth'")) == 1
