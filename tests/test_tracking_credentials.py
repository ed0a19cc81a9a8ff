"""Credentials in MLFLOW_TRACKING_URI: a real `dvc repro` logging to a real `mlflow server`
(conftest.py) through a URI with a user and password never writes them to a file, to
MLflow, or to the logs.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from repo_runs import ROW, SECRET, clone, edit_params, leaked_files, mlflow_runs, sh, with_credentials


@pytest.fixture(scope="module")
def credential_run(base, server, tmp_path_factory) -> dict:
    """`dvc repro` of the ablate stage (the one that logs) against the server, credentials in
    MLFLOW_TRACKING_URI."""
    repo = clone(base, tmp_path_factory.mktemp("credentials") / "r")
    edit_params(repo, lambda p: p["mlflow"].update(experiment_prefix="leak"))
    proc = sh(["dvc", "repro"], repo, check=False,
              extra={"MLFLOW_TRACKING_URI": with_credentials(server.uri)})
    return {"repo": repo, "proc": proc, "runs": mlflow_runs(server.uri, "leak-synth")}


@pytest.mark.slow
def test_tracking_credentials_are_never_written_to_files_or_mlflow(credential_run):
    proc, runs = credential_run["proc"], credential_run["runs"]
    assert proc.returncode == 0, proc.stderr
    assert "Running stage 'ablate'" in proc.stdout  # the stage that logs, the only one run
    leaks = leaked_files(credential_run["repo"])  # params.yaml, dvc.lock, metrics/, results/, .dvc/
    assert not leaks, leaks
    per_row = Counter(r.data.tags["row"] for r in runs)  # the CNN row (and the baseline):
    assert per_row[ROW] == 3 and set(per_row.values()) == {3}, per_row  # parent + 2 folds each
    for r in runs:
        blob = json.dumps([r.data.params, r.data.tags, r.info.artifact_uri])
        assert SECRET not in blob and "alice" not in blob, blob


@pytest.mark.slow
def test_tracking_credentials_never_reach_the_logs(credential_run):
    proc = credential_run["proc"]
    assert SECRET not in proc.stdout + proc.stderr
