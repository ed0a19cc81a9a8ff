"""Archive download (pooch over HTTP on 127.0.0.1, file://), checksums, safe extraction."""

import hashlib
import http.server
import io
import stat
import threading
import zipfile
from pathlib import Path

import pytest
import soundfile as sf
from helpers import LETTERS, ROOT, utterance
from repo_runs import sh

from mdser.corpora import prepare
from mdser.corpora.download import fetch_archive, safe_extract_zip
from mdser.errors import UserError


def emodb_zip() -> bytes:
    """An EMODB-format archive: wav/ with one utterance per class for two speakers, lablaut/."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, spk in enumerate(("03", "16")):
            for j, letter in enumerate(LETTERS):
                wav = io.BytesIO()
                sf.write(wav, utterance(0.8, 16000, 10 * i + j), 16000, format="WAV",
                         subtype="PCM_16")
                zf.writestr(f"wav/{spk}a0{1 + j % 5}{letter}a.wav", wav.getvalue())
        zf.writestr("lablaut/03a01Fa.lab", "label file\n")
        zf.writestr("erklaerung.txt", "docs\n")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `routes`; a route listed in `cut` sends half its body then hangs up."""

    routes: dict[str, bytes] = {}
    cut: dict[str, int] = {}  # path -> how many more requests get cut short
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 - http.server API
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.cut.get(self.path, 0) > 0:
            self.cut[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    Handler.routes, Handler.cut, Handler.hits = {}, {}, {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verified(server, tmp_path):
    base, handler = server
    handler.routes["/download.zip"] = body = emodb_zip()
    path, digest = fetch_archive(f"{base}/download.zip", sha(body), tmp_path / "dl", retries=0)
    assert path == tmp_path / "dl" / "download.zip" and path.read_bytes() == body
    assert digest == sha(body)
    # second call finds the verified file and does not download again
    fetch_archive(f"{base}/download.zip", "sha256:" + sha(body).upper(), tmp_path / "dl")
    assert handler.hits["/download.zip"] == 1


def test_download_without_hash_returns_computed_hash(server, tmp_path):
    base, handler = server
    handler.routes["/download.zip"] = body = emodb_zip()
    _, digest = fetch_archive(f"{base}/download.zip", "", tmp_path, retries=0)
    assert digest == sha(body)


def test_checksum_mismatch_is_clear_and_keeps_nothing(server, tmp_path):
    base, handler = server
    handler.routes["/download.zip"] = body = emodb_zip()
    wrong = "0" * 64
    with pytest.raises(UserError) as err:
        fetch_archive(f"{base}/download.zip", wrong, tmp_path / "dl", retries=0)
    msg = str(err.value)
    assert f"{base}/download.zip" in msg and wrong in msg and sha(body) in msg
    assert list((tmp_path / "dl").iterdir()) == []


def test_interrupted_download_is_retried(server, tmp_path):
    base, handler = server
    handler.routes["/download.zip"] = body = emodb_zip()
    handler.cut["/download.zip"] = 1  # first response hangs up half-way
    path, digest = fetch_archive(f"{base}/download.zip", "", tmp_path, retries=2)
    assert handler.hits["/download.zip"] == 2
    assert digest == sha(body) and path.read_bytes() == body


def test_interrupted_download_that_never_completes_keeps_nothing(server, tmp_path):
    base, handler = server
    handler.routes["/download.zip"] = emodb_zip()
    handler.cut["/download.zip"] = 99
    with pytest.raises(UserError, match="could not download"):
        fetch_archive(f"{base}/download.zip", "", tmp_path / "dl", retries=1)
    assert handler.hits["/download.zip"] == 2
    assert list((tmp_path / "dl").iterdir()) == []


def test_http_error_is_a_user_error(server, tmp_path):
    base, _ = server
    with pytest.raises(UserError, match="404"):
        fetch_archive(f"{base}/missing.zip", "", tmp_path, retries=0)


def test_file_url_mirror(tmp_path):
    body = emodb_zip()
    src = tmp_path / "mirror" / "download.zip"
    src.parent.mkdir()
    src.write_bytes(body)
    path, digest = fetch_archive(src.as_uri(), sha(body), tmp_path / "dl")
    assert digest == sha(body) and path.read_bytes() == body
    with pytest.raises(UserError, match="checksum mismatch"):
        fetch_archive(src.as_uri(), "1" * 64, tmp_path / "dl2")
    assert list((tmp_path / "dl2").iterdir()) == []
    with pytest.raises(UserError, match="no such file"):
        fetch_archive((tmp_path / "nope.zip").as_uri(), "", tmp_path / "dl3")


def test_bad_sha256_parameter(tmp_path):
    with pytest.raises(UserError, match="data.emodb.sha256"):
        fetch_archive("http://127.0.0.1:9/x.zip", "abc", tmp_path)


def hostile_zip(path: Path, name: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("wav/ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else "evil")
    return path


@pytest.mark.parametrize("name,symlink", [
    ("../evil.txt", False),
    ("wav/../../evil.txt", False),
    ("/tmp/evil.txt", False),
    ("..\\evil.txt", False),
    ("C:/evil.txt", False),
    ("wav/link", True),
])
def test_path_traversal_archive_refused_before_writing(tmp_path, name, symlink):
    archive = hostile_zip(tmp_path / "evil.zip", name, symlink)
    target = tmp_path / "out" / "raw"
    with pytest.raises(UserError) as err:
        safe_extract_zip(archive, target)
    assert repr(name) in str(err.value)
    assert not target.exists()  # nothing written, not even the harmless entry
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_corrupt_archive(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(UserError, match="not a readable zip"):
        safe_extract_zip(tmp_path / "bad.zip", tmp_path / "out")
    body = bytearray(emodb_zip())
    body[200:260] = b"\x00" * 60  # damage compressed data of the first entry
    (tmp_path / "crc.zip").write_bytes(bytes(body))
    with pytest.raises(UserError, match="corrupt"):
        safe_extract_zip(tmp_path / "crc.zip", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_prepare_emodb_end_to_end_over_http(server, tmp_path, caplog):
    base, handler = server
    handler.routes["/download.zip"] = body = emodb_zip()
    data = {"corpus": "emodb", "min_duration": 0.5,
            "emodb": {"root": "", "url": f"{base}/download.zip", "sha256": ""}}
    df, info = prepare(data, tmp_path / "raw")
    assert info["archive_sha256"] == sha(body) and not info["sha256_verified"]
    assert sha(body) in info["notice"] and sha(body) in caplog.text
    assert len(df) == 14 and (df["status"] == "kept").all()
    assert df["path"].str.startswith("wav/").all()
    assert set(df["speaker"]) == {"03", "16"}
    # pinned hash: verified
    data["emodb"]["sha256"] = sha(body)
    _, info = prepare(data, tmp_path / "raw2")
    assert info["sha256_verified"]


def test_dvc_commands_in_tests_send_no_usage_report():
    """DVC starts a daemon after each command that sends a usage report over the network
    (and, offline, leaves the report in the temporary directory); tests turn it off."""
    proc = sh(["dvc", "status", "-v"], ROOT, check=False)
    log = proc.stdout + proc.stderr
    assert "Analytics is disabled" in log and "'daemon', 'analytics'" not in log, log[-2000:]
