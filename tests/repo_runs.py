"""Real runs in a temporary copy of the repository: the copy itself (tiny configuration),
`dvc`, stage scripts and `mlflow server` as processes, and what they leave behind.

Used by test_pipeline.py and the fault-injection modules (test_bad_input.py,
test_interrupted_repro.py, test_queue.py, test_tracking_credentials.py); the shared runs
themselves (`base`, `server`) are fixtures in conftest.py. Nothing of DVC or MLflow is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from helpers import only_rows, tiny_params

BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"
EXPERIMENT = "mdser-synth"

# the ablation rows of a copy: a plain CNN, an SPP row and an ArcFace row with attention
PIPELINE_ROWS = ["cnn-gmp-softmax", "ff-spp-softmax", "mdcnn-ff-spp-att-arcface"]
# the one row of the fault-injection runs (ArcFace: arcface.* matter)
ROW = "mdcnn-ff-spp-arcface"
ROW_MODEL = {"conv": "mdcb", "pooling": "spp", "spp_levels": [1, 5, 10], "attention": False,
             "head": "arcface"}


# --- a copy of the repository --------------------------------------------------------------------


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run with the venv first on PATH and no MLFLOW_TRACKING_URI, output captured."""
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """The repository's tracked shape (no data, no caches), as a fresh git repo, with the tiny
    configuration (helpers.tiny_params) and the ablation rows PIPELINE_ROWS."""
    from mdser.bench.pipeline import copy_repo as copy_tracked_shape

    return copy_tracked_shape(dest, lambda _: only_rows(tiny_params(), PIPELINE_ROWS))


def table_files(repo: Path) -> dict[str, bytes]:
    """The ablation table's three files, as bytes."""
    return {s: (repo / f"metrics/ablation.{s}").read_bytes() for s in ("md", "csv", "json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes in a copy ------------------------------------------------------------------------


def env_for(repo: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The venv first on PATH, the copy's own `src` first on the import path."""
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env | (extra or {})


def sh(cmd: list[str], repo: Path, check: bool = True, extra: dict[str, str] | None = None,
       timeout: float = 900) -> subprocess.CompletedProcess:
    """Run and capture through files, not pipes: `dvc queue start` leaves daemons holding them."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc = subprocess.run(cmd, cwd=repo, env=env_for(repo, extra), stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
    if check and rc != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({rc}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def edit_params(repo: Path, mutate: Callable[[dict], None]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    mutate(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def one_row(params: dict) -> None:
    params["ablation"]["rows"] = {ROW: dict(ROW_MODEL)}
    if "steps" in params["ablation"]:  # a step may name only rows of the table (or the baseline)
        params["ablation"]["steps"] = {ROW: "baseline"}


def commit_all(repo: Path, message: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
        "-m", message], repo)


def fresh_repo(dest: Path) -> Path:
    """copy_repo (tiny config) with the single ArcFace row ROW, committed."""
    repo = copy_repo(dest)
    edit_params(repo, one_row)
    commit_all(repo, "one row")
    return repo


def clone(base: Path, dest: Path, keep_mlruns: bool = False) -> Path:
    """A copy of a finished repository (git, DVC cache, outputs), without its MLflow store and
    resume cache."""
    shutil.copytree(base, dest, symlinks=True)
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    if not keep_mlruns:
        shutil.rmtree(dest / "mlruns", ignore_errors=True)
    return dest


# --- what a run leaves ----------------------------------------------------------------------------


def partials(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*.partial") if ".git" not in p.parts]


def lock_stages(repo: Path) -> set[str]:
    path = repo / "dvc.lock"
    return set(yaml.safe_load(path.read_text())["stages"]) if path.exists() else set()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# --- MLflow ----------------------------------------------------------------------------------------


def mlflow_runs(uri: str, experiment: str = EXPERIMENT) -> list:
    """Every run (any status) of `experiment` in the store or server at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=10000)


def local_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"


SECRET = "s3cret"


def with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://alice:{SECRET}@")


def leaked_files(repo: Path) -> list[str]:
    """The files under `repo` that hold SECRET."""
    return [str(p.relative_to(repo)) for p in repo.rglob("*")
            if p.is_file() and SECRET.encode() in p.read_bytes()]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
             "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workdir = workdir

    def wait_ready(self) -> MlflowServer:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                assert self.proc.poll() is None, (self.workdir / "server.log").read_text()
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


# --- the reference run, started in the background -------------------------------------------------


class BackgroundRepro:
    """`dvc repro` of a fresh one-row copy, started (once) by `start()` and run in the
    background while other tests go on; `result()` waits for it and commits its outputs."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.repo: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.done = False

    def start(self) -> None:
        if self.proc is not None:
            return
        self.repo = fresh_repo(self.dest)
        self.log = self.repo.parent / "base-repro.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(["dvc", "repro"], cwd=self.repo, env=env_for(self.repo),
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def result(self) -> Path:
        self.start()
        if not self.done:
            assert self.proc.wait(timeout=1200) == 0, self.log.read_text()
            commit_all(self.repo, "repro")
            self.done = True
        return self.repo

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
