"""Checked, atomic, retried downloads (pooch) and safe zip extraction.

pooch streams to a temporary file in the destination folder and moves it to
its final name only once it is complete and its hash matches, so a killed or
broken download never leaves a file that looks finished.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pooch
import requests

from mdser.corpora.manifest import sha256_file
from mdser.errors import UserError

log = logging.getLogger(__name__)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_UNPACKED_BYTES = 20 * 2**30  # refuse zip bombs; EMODB unpacks to ~50 MB


def normalize_sha256(sha256: str) -> str:
    """Lower-case hex digest from "", "<hex>" or "sha256:<hex>"; "" stays ""."""
    value = (sha256 or "").strip().lower()
    value = value.removeprefix("sha256:")
    if value and not HEX64.match(value):
        raise UserError(
            f"data.emodb.sha256: {sha256!r} is not a SHA-256 hex digest (64 hex digits)"
        )
    return value


def archive_name(url: str) -> str:
    """File name for the archive: the URL's last path part, made safe."""
    name = Path(unquote(urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "archive.zip"


def fetch_archive(
    url: str, sha256: str, dest_dir: Path, retries: int = 3, timeout: float = 60.0
) -> tuple[Path, str]:
    """Download `url` into `dest_dir` and return (path, sha256 of the file).

    With `sha256` set, the file is verified before it gets its final name;
    a mismatch is a UserError and keeps nothing. With `sha256` empty, the
    computed hash is returned so the caller can record and report it.
    http(s) goes through pooch (retried `retries` times); file:// URLs and
    plain paths are copied with the same checks.
    """
    expected = normalize_sha256(sha256)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("file", ""):
        path = _copy_local(url, expected, dest_dir)
    elif scheme in ("http", "https", "ftp"):
        path = _download(url, expected, dest_dir, retries, timeout)
    else:
        raise UserError(f"data.emodb.url: unsupported URL scheme {scheme!r} in {url!r}")
    actual = sha256_file(path)
    if expected and actual != expected:  # a cached file changed under us
        path.unlink(missing_ok=True)
        raise UserError(_mismatch(url, expected, actual))
    return path, actual


def _mismatch(url: str, expected: str, actual: str) -> str:
    return (
        f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
        "the download was deleted (check data.emodb.url and data.emodb.sha256)"
    )


def _download(url: str, expected: str, dest_dir: Path, retries: int, timeout: float) -> Path:
    """pooch download with retries and hash check into dest_dir."""
    name = archive_name(url)
    fetcher = pooch.create(
        path=dest_dir, base_url="", registry={name: expected or None},
        urls={name: url}, retry_if_failed=retries,
    )
    try:
        http = urlparse(url).scheme.lower() in ("http", "https")
        downloader = pooch.HTTPDownloader(timeout=timeout) if http else None
        return Path(fetcher.fetch(name, downloader=downloader))
    except ValueError as exc:  # pooch: hash mismatch (the new download is already deleted)
        (dest_dir / name).unlink(missing_ok=True)  # an older file of that name is stale too
        got = re.search(r"but got ([0-9a-f]{64})", str(exc))
        raise UserError(_mismatch(url, expected, got.group(1) if got else f"? ({exc})")) from exc
    except requests.RequestException as exc:
        raise UserError(
            f"could not download {url} after {1 + retries} attempts: {exc}; "
            "nothing was kept (check data.emodb.url or the network)"
        ) from exc


def _copy_local(url: str, expected: str, dest_dir: Path) -> Path:
    """Copy a file:// URL (or plain path) into dest_dir via a temporary file."""
    parsed = urlparse(url)
    source = Path(url2pathname(parsed.path)) if parsed.scheme else Path(url)
    if not source.is_file():
        raise UserError(f"data.emodb.url: {url!r}: no such file {source}")
    target = dest_dir / archive_name(source.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=dest_dir)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        actual = sha256_file(Path(tmp))
        if expected and actual != expected:
            raise UserError(_mismatch(url, expected, actual))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _unsafe_reason(info: zipfile.ZipInfo) -> str:
    """Why a zip entry may not be extracted, or ""."""
    name = info.filename
    kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # Unix
    if kind == stat.S_IFLNK:
        return "is a symbolic link"
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "is not a regular file or folder"
    if "\x00" in name:
        return "contains a NUL byte"
    win = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or win.drive or win.is_absolute():
        return "is an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "contains '..'"
    return ""


def safe_extract_zip(archive: Path, target: Path) -> list[Path]:
    """Extract `archive` into `target`; refuse the whole archive if any entry is unsafe.

    Every entry is checked before anything is written: absolute paths,
    `..` components, symbolic links and special files are refused, as is
    an archive that would unpack to more than MAX_UNPACKED_BYTES.
    Returns the extracted file paths.
    """
    archive, target = Path(archive), Path(target)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        root = Path(os.path.abspath(target))
        for info in infos:
            reason = _unsafe_reason(info)
            dest = Path(os.path.abspath(root / info.filename.replace("\\", "/")))
            if not reason and dest != root and root not in dest.parents:
                reason = "would land outside the target folder"
            if reason:
                raise UserError(
                    f"{archive}: refusing to extract entry {info.filename!r}: {reason}; "
                    "nothing was extracted"
                )
        total = sum(i.file_size for i in infos)
        if total > MAX_UNPACKED_BYTES:
            raise UserError(f"{archive}: would unpack to {total} bytes (> {MAX_UNPACKED_BYTES})")
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
            raise UserError(f"{archive}: corrupt archive ({exc}); nothing was extracted") from exc
        if bad is not None:
            raise UserError(
                f"{archive}: corrupt entry {bad!r} (CRC mismatch); nothing was extracted"
            )
        target.mkdir(parents=True, exist_ok=True)
        out = []
        for info in infos:
            out.append(Path(zf.extract(info, target)))
    return [p for p in out if p.is_file()]
