"""`python -m mdser.screenshot`: the real MLflow UI, in a headless Chromium, shows the rows' UA."""

from __future__ import annotations

import shutil
import sys

import pytest
from repo_runs import sh

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium"),
]


def test_the_screenshot_shows_the_ua_columns_of_the_parent_runs(base, tmp_path):
    out = tmp_path / "mlflow-ui.png"
    proc = sh([sys.executable, "-m", "mdser.screenshot", str(out)], base, timeout=300)
    assert "parent runs with ua_mean, ua_std, ua_ci_low, ua_ci_high, wa_mean" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
