"""A screenshot of the real MLflow UI comparing the ablation rows (for the README).

    python -m mdser.screenshot docs/mlflow-ui.png

Starts `mlflow server` on 127.0.0.1 against the local store and opens the corpus's
experiment in a headless Chromium (Debian package `chromium`), driven over the DevTools
protocol on a pipe (standard library only): the parent (row) runs sorted by `ua_mean`,
the columns `ua_mean`, `ua_std`, `ua_ci_low`, `ua_ci_high` and `wa_mean` switched on in
the Columns menu, the assistant panel and the sidebar closed — the clicks the README's
*MLflow* section describes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mdser.errors import UserError, run_stage
from mdser.params import load_params
from mdser.tracking import client, local_store

WIDTH, HEIGHT = 1800, 820
COLUMNS = ("ua_mean", "ua_std", "ua_ci_low", "ua_ci_high", "wa_mean")
HIDDEN = ("Dataset", "Source", "Models")  # shown by default, empty here
# What a user clicks: close the assistant and the sidebar, tick the columns in "Columns".
CLICKS = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  document.querySelector("button[aria-label=Close]")?.click();
  document.querySelector("button[aria-label='Toggle sidebar']")?.click();
  const menu = Array.from(document.querySelectorAll("button")).find(b => b.innerText.trim() === "Columns");
  menu.click();
  await sleep(1000);
  const titles = Array.from(document.querySelectorAll(".du-bois-light-tree-title"));
  for (const name of %s) {
    const title = titles.find(e => e.textContent === name);
    if (title) { title.click(); await sleep(200); }
  }
  document.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape", bubbles: true}));
  document.querySelector("h1, h2")?.click();
  await sleep(1500);
  return Array.from(document.querySelectorAll("[role=columnheader]")).map(e => e.innerText.trim());
})()"""


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, chromium: str, profile: Path):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def on_fds_3_and_4() -> None:  # in the child, before exec: the protocol's fds
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=on_fds_3_and_4, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise UserError("chromium exited before answering")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, page: bool = False) -> Any:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:  # events in between are skipped
            reply = self._message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise UserError(f"chromium: {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, page=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._in)
        os.close(self._out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Any, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def runs_page_url(port: int, experiment_id: str) -> str:
    query = urllib.parse.urlencode({"searchFilter": 'tags.level = "row"',
                                    "orderByKey": "metrics.`ua_mean`", "orderByAsc": "false"},
                                   quote_via=urllib.parse.quote)
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?{query}"


def screenshot(out: Path, experiment_id: str, chromium: str) -> list[str]:
    """Serve the local store, click as the README says, write `out`; the columns shown."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{local_store() / 'mlflow.db'}", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = Path(tempfile.mkdtemp(prefix="mdser-chromium-"))
    browser = None
    try:
        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
            except OSError:
                return False

        wait_until(healthy, "the MLflow server")
        browser = Browser(chromium, profile)
        browser.send("Emulation.setDeviceMetricsOverride", {
            "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, page=True)
        browser.send("Page.navigate", {"url": runs_page_url(port, experiment_id)}, page=True)
        wait_until(lambda: browser.evaluate(
            "document.querySelectorAll('[role=row]').length > 1 && "
            "!!document.querySelector('button[aria-label=Close]')"), "the runs table")
        columns = browser.evaluate(CLICKS % json.dumps([*HIDDEN, *COLUMNS]))
        png = browser.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(png))
        return columns
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise UserError("no chromium on PATH: install Debian's `chromium` package")
    params = load_params()
    name = f"{params['mlflow']['experiment_prefix']}-{params['data']['corpus']}"
    exp = client().get_experiment_by_name(name)
    if exp is None:
        raise UserError(f"no MLflow experiment {name!r} yet: run `dvc repro` first")
    columns = screenshot(args.out, exp.experiment_id, chromium)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise UserError(f"the runs table shows no {missing} column: the MLflow UI changed")
    print(f"{name}: parent runs with {', '.join(COLUMNS)} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
