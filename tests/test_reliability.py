"""Reliability and security (issue 7): faults injected into REAL runs.

Every test runs real processes in a temporary copy of the repository: `dvc repro`,
`dvc exp run --queue` + `dvc queue start`, an `mlflow server` on 127.0.0.1, and
the stage scripts. Nothing of DVC or MLflow is mocked. The configuration is tiny
(see `test_pipeline.tiny_params`, one ArcFace ablation row).

Faults: bad parameters (refused by the `check` stage before DVC deletes any output, or by
the stage script itself), kills (SIGINT, SIGTERM, SIGKILL to the process group) at
several points of a run, each reached deterministically (the run is frozen with SIGSTOP
at the kill point; for the MLflow kill the stage freezes itself through a test-only
`sitecustomize`), two queued experiments running at once (local store and
server), a NaN loss, a corpus file changed after `download`, a damaged feature
store, credentials in the tracking URI, 30-second utterances.

The zip path-traversal / symlink refusal is covered by
tests/test_download.py::test_path_traversal_archive_refused_before_writing and is
not repeated here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_pipeline import copy_repo

ROOT = Path(__file__).resolve().parents[1]
ROW = "mdcnn-ff-spp-arcface"  # the one ablation row of these runs (ArcFace: arcface.* matter)
ROW_MODEL = {"conv": "mdcb", "pooling": "spp", "spp_levels": [1, 5, 10], "attention": False,
             "head": "arcface"}
EXPERIMENT = "mdser-synth"
BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"


# --- helpers ------------------------------------------------------------------------------


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
    """copy_repo (tiny config) with a single ArcFace row, committed."""
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


def table_files(repo: Path) -> dict[str, bytes]:
    return {s: (repo / f"metrics/ablation.{s}").read_bytes() for s in ("md", "csv", "json")}


def partials(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*.partial") if ".git" not in p.parts]


def lock_stages(repo: Path) -> set[str]:
    path = repo / "dvc.lock"
    return set(yaml.safe_load(path.read_text())["stages"]) if path.exists() else set()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class MlflowServer:
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


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _base_build(request, tmp_path_factory):
    """Start the reference run in the background as soon as the module starts (if needed),
    so that it overlaps the bad-parameter and interruption runs."""
    if not any("base" in item.fixturenames for item in request.session.items):
        yield None
        return
    repo = fresh_repo(tmp_path_factory.mktemp("base"))
    log = repo.parent / "base-repro.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env_for(repo), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    yield repo, proc, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def base(_base_build) -> Path:
    """The uninterrupted reference run: `dvc repro` of the tiny pipeline, then committed."""
    repo, proc, log = _base_build
    assert proc.wait(timeout=1200) == 0, log.read_text()
    commit_all(repo, "repro")
    return repo


@pytest.fixture(scope="module", autouse=True)
def _server_start(request, tmp_path_factory):
    """Start the MLflow server in the background as soon as the module starts (if needed)."""
    if not any("server" in item.fixturenames for item in request.session.items):
        yield None
        return
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(_server_start) -> MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    return _server_start.wait_ready()


# --- 6. security: the source (static) ------------------------------------------------------------


UNSAFE = {
    r"yaml\.(load|unsafe_load|full_load)\s*\(": "yaml loaded without the safe loader",
    r"yaml\.(Unsafe|Full)?Loader\b": "a non-safe YAML loader",
    r"allow_pickle\s*=\s*True": "numpy pickles allowed",
    r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b": "a pickle module",
    r"\b(pickle|joblib|dill|torch)\.load\s*\(": "a pickle load",
    r"0\.0\.0\.0": "a server bound to every interface",
}


def test_source_uses_safe_loaders_and_no_pickle():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py"))
    found = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for pattern, why in UNSAFE.items():
                if re.search(pattern, line):
                    found.append(f"{f.relative_to(ROOT)}:{n}: {why}: {line.strip()}")
    assert len(files) > 20
    assert not found, "\n".join(found)


def test_readme_mlflow_server_listens_on_localhost_only():
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"mlflow (server|ui)", line):
            assert "0.0.0.0" not in line, line
            assert not re.search(r"--host\s+(?!127\.0\.0\.1|localhost)", line), line


# --- 7. resource bounds --------------------------------------------------------------------------


def test_batches_of_30_second_utterances_stay_within_the_frame_budget():
    from mdser.batching import TIME_QUANTUM, length_batches, pad_batch

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budget = params["train"]["batch_frames"]
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(50, 3001, 300), [3001, 3001, 3000, 2999, 51]])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = pd.DataFrame({"frames": lengths, "offset": offsets})
    n_mels = params["features"]["n_mels"]
    frames = np.zeros((int(lengths.sum()), n_mels, 3), np.float32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    seen = []
    for idx in length_batches(lengths, budget, rng):
        x, true = pad_batch(frames, rows.iloc[idx], mean, std)
        padded = x.shape[0] * x.shape[2]
        assert x.shape[2] % TIME_QUANTUM == 0 and x.shape[2] >= true.max()
        assert padded <= budget or len(idx) == 1, (len(idx), x.shape)
        assert x.nbytes <= max(budget, x.shape[2]) * n_mels * 3 * 4
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(lengths)))


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, tensorflow as tf
    from mdser.params import load_params, row_model
    from mdser.model import build_model, per_sample_loss
    params = load_params(sys.argv[1])
    rows = params["ablation"]["rows"]
    row = max(rows, key=lambda r: (row_model(params, r)["conv"] == "mdcb",
                                   len(row_model(params, r)["spp_levels"]),
                                   bool(row_model(params, r)["attention"])))
    n_mels, budget = params["features"]["n_mels"], params["train"]["batch_frames"]
    rng = np.random.default_rng(0)
    out = {"row": row}
    for profile, filters in (("default", None), ("paper", 128)):
        model_params = row_model(params, row) | ({"filters": filters} if filters else {})
        model = build_model(model_params, 7, n_mels=n_mels)
        loss_fn = per_sample_loss(model_params["head"], params["arcface"], params["softmax"])
        # one 30 s utterance (3001 frames, padded to 3008), then a full batch of short ones
        for b, t, n in ((1, 3008, 3001), (budget // 256, 256, 250)):
            x = rng.standard_normal((b, n_mels, t, 3)).astype(np.float32)
            with tf.GradientTape() as tape:
                y = model({"features": x, "lengths": np.full(b, n, np.int32)}, training=True)
                loss = tf.reduce_mean(loss_fn(np.zeros(b, np.int32), y))
            grads = tape.gradient(loss, model.trainable_variables)
            assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
        out[profile] = {"filters": model_params["filters"],
                        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_30_second_utterance_trains_well_within_24_gb(tmp_path):
    """Forward + backward of the heaviest row on a 30 s utterance and on a full batch, with
    the default filters and with the paper's 128: peak RSS of the process."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT / "params.yaml")],
                          env=env_for(ROOT) | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for profile in ("default", "paper"):
        r = result[profile]
        print(f"30 s utterance, row {result['row']}, {r['filters']} filters: "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    assert result["default"]["peak_rss_bytes"] < 4 * 2**30  # a sixth of a 24 GB machine
    assert result["paper"]["peak_rss_bytes"] < 12 * 2**30  # half of it


# --- 1. parameters checked before any work -------------------------------------------------------


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


# --- 3a. concurrency: the local store's lock -----------------------------------------------------


LOCK_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from filelock import FileLock, Timeout
    os.chdir(sys.argv[1])
    from mdser import tracking
    tracking.client()  # what log_row does first
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


# --- 2. interruption ------------------------------------------------------------------------


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
    # frozen by FREEZE_HOOK right after fold 0's predictions reached MLflow: the parent run
    # and fold 0's run are RUNNING, fold 1 is not logged yet
    frozen, marker = freeze_after_artifact(repo, "evaluate.py", "predictions.csv")
    kill("evaluate, MLflow logging", marker.exists, signal.SIGKILL, f"evaluate@{ROW}", None,
         frozen)
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
    after_kill = next(k for k in interrupted["kills"] if k["point"].startswith("evaluate"))
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
    # ... and the rerun's log_row closed them (KILLED) before logging the row again
    runs = mlflow_runs(local_uri(interrupted["repo"]))
    dangling = [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"]
    assert not dangling, dangling
    killed = sorted(r.info.run_name for r in runs if r.info.status == "KILLED")
    assert killed == sorted([ROW, f"{ROW}/fold0"]), killed


# --- 1b. more folds than speakers, at the train stage --------------------------------------------


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


# --- 4. numerical faults --------------------------------------------------------------------


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


# --- 5. integrity -----------------------------------------------------------------------------


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


# --- 6b. security: credentials in the tracking URI -----------------------------------------------


SECRET = "s3cret"


def with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://alice:{SECRET}@")


def leaked_files(repo: Path) -> list[str]:
    return [str(p.relative_to(repo)) for p in repo.rglob("*")
            if p.is_file() and SECRET.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def credential_run(base, server, tmp_path_factory) -> dict:
    """`dvc repro` of the evaluate stage against the server, credentials in MLFLOW_TRACKING_URI."""
    repo = clone(base, tmp_path_factory.mktemp("credentials") / "r")
    edit_params(repo, lambda p: p["mlflow"].update(experiment_prefix="leak"))
    proc = sh(["dvc", "repro"], repo, check=False,
              extra={"MLFLOW_TRACKING_URI": with_credentials(server.uri)})
    return {"repo": repo, "proc": proc, "runs": mlflow_runs(server.uri, "leak-synth")}


@pytest.mark.slow
def test_tracking_credentials_are_never_written_to_files_or_mlflow(credential_run):
    proc, runs = credential_run["proc"], credential_run["runs"]
    assert proc.returncode == 0, proc.stderr
    assert f"Running stage 'evaluate@{ROW}'" in proc.stdout
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


# --- 3b. concurrency: two queued experiments, two workers ----------------------------------------


QUEUED_S = [3.0, 4.0]


def start_queue(repo: Path, extra: dict[str, str] | None) -> None:
    """Queue one experiment per arcface.s value and start two workers. The target is the
    row's evaluate stage (train + evaluate: the stage that logs to MLflow), not the table."""
    for s in QUEUED_S:
        sh(["dvc", "exp", "run", "--queue", "-S", f"arcface.s={s}", f"evaluate@{ROW}"], repo,
           extra=extra)
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
    return len(rows) == len(QUEUED_S) and all(r[-1] in ("Success", "Failed") for r in rows)


def _check_runs(runs: list) -> dict[str, int]:
    parents = [r for r in runs if r.data.tags.get("level") == "row"]
    per_key = Counter((r.data.tags.get("dvc.exp_name"), r.data.tags["row"]) for r in parents)
    assert set(per_key.values()) == {1}, per_key  # none duplicated
    assert len(per_key) == len(QUEUED_S), per_key  # none lost
    assert all(name for name, _ in per_key), "a parent run has no dvc.exp_name tag"
    assert sorted(float(r.data.params["arcface.s"]) for r in parents) == QUEUED_S
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
        for repo, extra, _ in cases.values():
            start_queue(repo, extra)
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
        r |= {"repo": repo, "uri": uri}
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
    counts = _check_runs(q["runs"])
    assert {r.data.tags["dvc.exp_name"] for r in q["runs"]} == set(q["exp_names"])
    print(f"queue: {len(QUEUED_S)} experiments on 2 workers, {q['seconds']:.0f} s, {counts}")


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
    assert len(q["runs"]) == 6  # 2 experiments x (1 row + 2 folds)
    assert not (q["repo"] / "mlruns").exists()  # nothing went to a local store
    client = MlflowClient(server.uri)
    for r in q["runs"]:
        assert client.list_artifacts(r.info.run_id), r.info.run_name


@pytest.mark.slow
def test_queued_experiments_write_no_credentials(queues):
    leaks = leaked_files(queues["server"]["repo"])
    assert not leaks, leaks
