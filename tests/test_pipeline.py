"""The real pipeline: `dvc repro` in a temporary copy of the repository (repo_runs.copy_repo:
the tiny configuration of helpers.tiny_params, the ablation rows PIPELINE_ROWS).

One module-scoped run is shared by the checks below; together they take a few
minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from repo_runs import PIPELINE_ROWS, copy_repo, free_port, run, table_files

ROWS = PIPELINE_ROWS
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("pipeline"))
    run(["dvc", "repro"], repo)
    return repo


def test_repro_writes_every_stage_and_the_table(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ["download", "resample", "featurize", "split", "ablate"]:
        assert stage in lock
    for row in ROWS:
        assert f"train@{row}" in lock and f"evaluate@{row}" in lock
    table = (repo / "metrics/ablation.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in table
    metrics = json.loads((repo / "metrics/ablation.json").read_text())
    assert set(metrics) == {"table1", "table3", "steps", "headline"}
    assert "best CNN row vs baseline" in metrics["headline"]
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "ua_mean" in shown


def test_second_repro_has_nothing_to_do(repo):
    out = run(["dvc", "repro"], repo).stdout
    assert "up to date" in out.lower()
    assert "Running stage" not in out


def test_a_colleague_pulls_from_a_dvc_remote_and_retrains_nothing(repo, tmp_path):
    """README *Beyond one machine*: push to a DVC remote (a folder here) with the run-cache; a
    fresh clone's `dvc pull --run-cache && dvc repro` runs no stage and has the same table.
    Without dvc.lock and models/, the run-cache alone restores every training."""
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], repo)
    run(["dvc", "push", "--run-cache"], repo)
    run(["git", "add", "dvc.lock", "metrics"], repo)
    run(["git", "commit", "-q", "-m", "the default run's results"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], clone)
    run(["dvc", "pull", "--run-cache"], clone)
    out = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    assert table_files(clone) == table_files(repo)
    assert sorted(p.name for p in (clone / "models").iterdir() if p.is_dir()) == sorted(ROWS)

    (clone / "dvc.lock").unlink()
    shutil.rmtree(clone / "models")
    out = run(["dvc", "repro", "-s", *(f"train@{row}" for row in ROWS)], clone).stdout
    for row in ROWS:
        assert f"Stage 'train@{row}' is cached - skipping run" in out, out
        weights = sorted((repo / "models" / row).rglob("model.weights.h5"))
        assert weights and all((clone / w.relative_to(repo)).read_bytes() == w.read_bytes() for w in weights)
    assert "Running stage" not in out, out


IMPORTED_BY_STAGE = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "tensorflow", "keras"}))
"""


def test_evaluate_and_baseline_stages_import_neither_tensorflow_nor_mlflow(repo, tmp_path):
    """The row stages after training stay light: ablate logs them to MLflow, and evaluate
    reads the scores train wrote (a stage's fixed cost is its imports, *Performance*)."""
    row = ROWS[0]
    for cmd in (["stages/evaluate.py", row, "data/features", "data/splits.json", f"models/{row}"],
                ["stages/baseline.py", "data/features", "data/splits.json"]):
        cmd += [str(tmp_path / Path(cmd[0]).stem), str(tmp_path / f"{Path(cmd[0]).stem}.json")]
        out = run([sys.executable, "-c", IMPORTED_BY_STAGE, *cmd], repo).stdout
        assert out.splitlines()[-1] == "[]", (cmd[0], out)


def test_arcface_change_touches_only_arcface_rows(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["arcface"]["s"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        arcface_rows = [r for r in ROWS if "arcface" in r]
        expected = {f"{s}@{r}" for s in ("train", "evaluate") for r in arcface_rows}
        assert set(status) == expected | {"check"}  # `check` reads every parameter
        dry = run(["dvc", "repro", "--dry"], repo).stdout
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        # --dry cannot know yet whether the table's inputs will change, so `ablate` may be absent
        assert expected <= ran <= expected | {"ablate", "check"}
    finally:
        run(["git", "checkout", "params.yaml"], repo)


def test_rerun_gives_byte_identical_tables(repo):
    before = table_files(repo)
    shutil.rmtree(repo / ".cache", ignore_errors=True)  # no resuming: really retrain
    run(["dvc", "repro", "--force", "--no-run-cache", "-s", "--glob", "train@*"], repo)
    run(["dvc", "repro"], repo)
    assert table_files(repo) == before


def test_table_from_mlflow_equals_the_dvc_table(repo):
    run([sys.executable, "-m", "mdser.table_from_mlflow", "metrics/from_mlflow"], repo)
    for suffix in ("md", "csv", "json"):
        assert (repo / f"metrics/from_mlflow.{suffix}").read_bytes() == (
            repo / f"metrics/ablation.{suffix}"
        ).read_bytes()


def test_test_speaker_never_in_training_or_selection(repo):
    folds = json.loads((repo / "data/splits.json").read_text())["folds"]
    for row in ROWS:
        for f in folds[:2]:
            stats = json.loads((repo / f"models/{row}/fold_{f['fold']}/fold.json").read_text())
            assert stats["fold"] == f["fold"]
            assert f["test"] not in f["train"] and f["test"] != f["val"]
        predictions = (repo / f"results/{row}/predictions.csv").read_text().splitlines()[1:]
        for line in predictions:
            fold, _, speaker = line.split(",")[:3]
            assert speaker == folds[int(fold)]["test"]


def test_mlflow_server_lists_parent_runs_with_fold_children(repo):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(
                f"{base}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        exp = json.loads(urllib.request.urlopen(
            f"{base}/experiments/get-by-name?experiment_name=mdser-synth", timeout=30).read())
        exp_id = exp["experiment"]["experiment_id"]
        parents = post("runs/search", {"experiment_ids": [exp_id], "filter": "tags.level = 'row'",
                                       "max_results": 1000})["runs"]
        latest = {}
        for run_ in parents:
            tags = {t["key"]: t["value"] for t in run_["data"]["tags"]}
            latest.setdefault(tags["row"], run_)
        assert sorted(latest) == sorted([*ROWS, "baseline"])
        for row, parent in latest.items():
            metrics = {m["key"] for m in parent["data"]["metrics"]}
            assert {"ua_mean", "ua_std", "wa_mean", "macro_f1_mean"} <= metrics
            pid = parent["info"]["run_id"]
            children = post("runs/search", {
                "experiment_ids": [exp_id], "filter": f"tags.mlflow.parentRunId = '{pid}'"})["runs"]
            assert len(children) == 2
            for child in children:
                keys = {m["key"] for m in child["data"]["metrics"]}
                curves = set() if row == "baseline" else {"val_ua", "train_loss", "lr"}
                assert {"test_ua"} | curves <= keys
    finally:
        server.terminate()
        server.wait(timeout=30)
