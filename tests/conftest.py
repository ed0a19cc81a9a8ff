"""Fixtures shared by the test modules.

The tiny configuration (params.yaml with a few keys shrunk) is `helpers.tiny_params`, and
the helpers of real runs in a copy of the repository are in `repo_runs`: plain modules that
test modules and subprocesses import (tests/ is on the import path, see pyproject.toml).

Here: the two expensive shared runs of the fault-injection modules, each made once per
session and started in the background as soon as the first module that needs it starts, so
that it overlaps that module's other tests:

* `base`: the uninterrupted reference run, `dvc repro` of a fresh one-row tiny copy, committed;
* `server`: a real `mlflow server` on 127.0.0.1 with its own store.

And the `gpu` marker (pyproject.toml): a test marked with it is skipped where TensorFlow sees
no GPU.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from repo_runs import BackgroundRepro, MlflowServer

import mdser  # noqa: F401  (sets TensorFlow's CPU kernels before any test module imports it)

# No network in tests: DVC's and MLflow's usage reports off, here and in every subprocess
# (a DVC command otherwise starts a daemon that tries to send one, and leaves its report
# in the temporary directory when it cannot).
os.environ |= {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


@functools.cache
def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not _gpus():
        pytest.skip("needs a GPU (TensorFlow sees none)")


@pytest.fixture(scope="session")
def _base_build(tmp_path_factory):
    build = BackgroundRepro(tmp_path_factory.mktemp("base"))
    yield build
    build.stop()


@pytest.fixture(scope="session")
def _server_start(tmp_path_factory):
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        if not servers:
            servers.append(MlflowServer(tmp_path_factory.mktemp("mlflow-server")))
        return servers[0]

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_shared_runs_early(request):
    """When a module starts, start in the background the shared runs its selected tests need."""
    needed = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            needed |= set(item.fixturenames)
    if "base" in needed:
        request.getfixturevalue("_base_build").start()
    if "server" in needed:
        request.getfixturevalue("_server_start")()


@pytest.fixture(scope="session")
def base(_base_build) -> Path:
    """The uninterrupted reference run: `dvc repro` of the tiny one-row pipeline, then committed."""
    return _base_build.result()


@pytest.fixture(scope="session")
def server(_server_start) -> MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    return _server_start().wait_ready()
