"""A screenshot of the real MLflow UI comparing the ablation rows (for the README).

    python -m mdser.screenshot docs/mlflow-ui.png

Starts `mlflow server` on 127.0.0.1 against the local store, opens the corpus's
experiment with the parent (row) runs listed, and captures it with a headless
Chromium (Debian package `chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mdser.errors import UserError, run_stage
from mdser.params import load_params
from mdser.tracking import client, local_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise UserError("no chromium on PATH: install Debian's `chromium` package")
    params = load_params()
    name = f"{params['mlflow']['experiment_prefix']}-{params['data']['corpus']}"
    exp = client().get_experiment_by_name(name)
    if exp is None:
        raise UserError(f"no MLflow experiment {name!r} yet: run `dvc repro` first")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{local_store() / 'mlflow.db'}", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        url = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs"
               "?searchFilter=tags.level%20%3D%20%22row%22&isComparingRuns=false")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1600,900", "--virtual-time-budget=20000",
             f"--screenshot={args.out.resolve()}", url],
            check=True, capture_output=True, timeout=120,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
