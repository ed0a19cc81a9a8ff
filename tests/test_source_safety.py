"""Security in the source itself (static): safe YAML and numpy loaders, no pickle, no server
bound to every interface.

The zip path-traversal / symlink refusal is covered by
tests/test_download.py::test_path_traversal_archive_refused_before_writing.
"""

from __future__ import annotations

import re

from helpers import ROOT

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
