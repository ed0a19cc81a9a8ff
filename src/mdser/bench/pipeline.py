"""The work DVC avoids: a fresh copy of the repository and timed `dvc` commands in it.

`copy_repo` makes the repository's tracked shape (no data, caches or results) a fresh git
repository; `timed_dvc` runs a dvc command and times each stage that ran; `dvc_work`
times a full `dvc repro`, a no-op one and `dvc exp run -S arcface.s=3`; `stage_startup`
is the fixed cost of each stage script (its interpreter and imports) beside TensorFlow's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mdser.bench import ROOT, log

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def _env(repo: Path) -> dict[str, str]:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",  # no usage-report daemon per command: the machine may be offline
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args],
                   cwd=repo, check=True, capture_output=True, env=_env(repo))


def copy_repo(dest: Path, shrink: Callable[[dict], dict] | None = None) -> Path:
    """The repository's tracked shape (no data, caches or results) as a fresh git repo."""
    for name in ["dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", "stages", "src",
                 ".dvc/config"]:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dst)
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if shrink is not None:
        params = shrink(yaml.safe_load((dest / "params.yaml").read_text()))
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "bench copy")
    return dest


def timed_dvc(repo: Path, *args: str) -> dict[str, Any]:
    """Run a dvc command, timestamping its output lines: wall time per stage that ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["dvc", *args], cwd=repo, env=_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    starts: list[tuple[str, float]] = []
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = STAGE_LINE.search(line)
        if m:
            starts.append((m.group(1), time.perf_counter() - t0))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stages = {}
    for i, (stage, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else wall
        stages[stage] = round(end - start, 2)
    return {"cmd": "dvc " + " ".join(args), "rc": rc, "wall_s": wall, "stages_run": stages,
            "tail": lines[-8:] if rc else []}


def _median_wall(cmd: list[str], repo: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def stage_startup(repo: Path, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of `python stages/<s>.py --help` per stage script (the
    interpreter and the script's module-level imports, no work), and of importing
    TensorFlow (what `train` adds when it starts training)."""
    out = {script.stem: _median_wall([sys.executable, str(script), "--help"], repo, repeats)
           for script in sorted((repo / "stages").glob("*.py"))}
    out["import tensorflow"] = _median_wall([sys.executable, "-c", "import tensorflow"], repo,
                                            repeats)
    return out


def dvc_work(rows: list[str] | None, quick: bool, work: Path) -> dict[str, Any]:
    """Full repro, no-op repro and an ArcFace-only experiment in a fresh copy."""
    def shrink(params: dict) -> dict:
        if rows:
            params["ablation"]["rows"] = {r: params["ablation"]["rows"][r] for r in rows}
        if quick:
            params["data"]["synth"].update(utterances=70)
            params["model"].update(filters=4, attention_units=8, fc_units=8)
            params["train"].update(folds=1, max_epochs=1)
        return params

    repo = copy_repo(work / "repo", shrink)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    row_names = list(params["ablation"]["rows"])
    log(f"dvc: full repro of {len(row_names)} rows in {repo}")
    full = timed_dvc(repo, "repro")
    log(f"dvc: full repro {full['wall_s']:.0f} s (rc {full['rc']})")
    noop = timed_dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "after repro")
    exp = timed_dvc(repo, "exp", "run", "-S", "arcface.s=3")
    log(f"dvc: no-op {noop['wall_s']:.1f} s, exp run {exp['wall_s']:.0f} s")
    startup = stage_startup(repo)
    arcface_rows = [r for r in row_names if params["ablation"]["rows"][r]["head"] == "arcface"]
    # `check` validates the changed params.yaml (seconds); no other stage before the rows
    expected = {f"{s}@{r}" for s in ("train", "evaluate") for r in arcface_rows} | {"check", "ablate"}
    data_stages = ("download", "resample", "featurize", "split")
    ran = set(exp["stages_run"])
    evaluate = {k: v for k, v in full["stages_run"].items() if k.startswith("evaluate@")}
    return {
        "shrunk": quick, "rows": row_names, "full_repro": full, "noop_repro": noop,
        "exp_run_arcface_s3": exp,
        "exp_data_stage_s": sum(exp["stages_run"].get(s, 0.0) for s in data_stages),
        "exp_expected_stages": sorted(expected), "exp_only_expected": ran == expected,
        "full_data_stage_s": {s: full["stages_run"].get(s) for s in data_stages},
        "full_train_s": sum(v for k, v in full["stages_run"].items() if k.startswith("train@")),
        "full_evaluate_s": sum(evaluate.values()),
        "evaluate_stage_s": evaluate,
        "stage_startup_s": startup,
    }
