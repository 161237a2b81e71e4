"""Download and unpack the official pix2pix dataset archives, robustly and safely.

The official script runs ``wget`` then ``tar -zxvf``; here the archive is streamed into ``NAME.tar.gz.part``
with a bounded number of retries (exponential back-off, resuming with an HTTP Range request when the
server allows it), checked against Content-Length, renamed only when complete, and extracted after every
member has been checked (no absolute paths, no ``..``, no links or devices).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

OFFICIAL_URL_BASE = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/"
OFFICIAL_DATASETS: tuple[str, ...] = ("facades", "maps", "edges2shoes", "edges2handbags", "night2day")
PHASES: tuple[str, ...] = ("train", "val", "test")
FACADES_ENV = "FASTPIX2PIX_FACADES"

_CITYSCAPES = (
    "cityscapes cannot be downloaded from the pix2pix server (license): download gtFine_trainvaltest.zip "
    "and leftImg8bit_trainvaltest.zip from the Cityscapes website yourself, build A|B pairs (e.g. with "
    "the official datasets/prepare_cityscapes_dataset.py), and use that folder as dataroot"
)
_RETRY_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed for good (after the allowed retries, or on an error that retrying cannot fix)."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder, or is not a plain file/folder."""


class _Incomplete(Exception):
    """An attempt ended before all the announced bytes arrived (worth retrying)."""


def shared_facades_root() -> Path | None:
    """The shared facades pairs: ``$FASTPIX2PIX_FACADES``, else ``<repo>/../shared/data/facades``.

    Returns None when the folder is absent, so that tests and benchmarks can skip.
    """
    override = os.environ.get(FACADES_ENV)
    root = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[2].parent / "shared" / "data" / "facades"
    )
    return root if root.is_dir() else None


def _content_range(header: str | None) -> tuple[int, int | None]:
    """``(first byte, total size or None)`` from ``Content-Range: bytes a-b/total``."""
    match = re.fullmatch(r"bytes\s+(\d+)-\d+/(\d+|\*)", (header or "").strip())
    if not match:
        raise _Incomplete(f"bad Content-Range {header!r}")
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _attempt(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One request: resume ``part`` if it has bytes and the server honours Range, else start over."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fastpix2pix", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Incomplete(f"server resumed at byte {start} instead of {have}")
            mode = "ab"
        else:  # a full response (no Range sent, or the server ignores it): start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with (
            part.open(mode) as out,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:  # more than announced: the partial file is unusable
            part.unlink()
        raise _Incomplete(
            f"size mismatch: received {size} bytes but the server announced {total} (Content-Length)"
        )


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``; retry up to ``retries`` times.

    Connection errors, time-outs, incomplete bodies and HTTP 408/429/5xx are retried after
    ``backoff * 2**k`` seconds; other HTTP errors (404...) fail at once. ``dest`` appears only complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _attempt(url, part, timeout, progress)
        except urllib.error.HTTPError as err:
            if err.code == 416 and part.exists():  # the Range is past the end: the .part is stale
                part.unlink()
            elif err.code not in _RETRY_HTTP_CODES:
                raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
            last_error = f"HTTP {err.code} {err.reason}"
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last_error = f"{type(err).__name__}: {err}" if not isinstance(err, _Incomplete) else str(err)
        else:
            part.replace(dest)
            return dest
    raise DownloadError(f"cannot download {url} after {retries + 1} attempts; last error: {last_error}")


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or re.match(r"^[A-Za-z]:", member.name):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} has an absolute path; refusing to extract"
        )
    if ".." in path.parts or ".." in member.name.split("\\"):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} points outside the folder (..); refusing"
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a link or special file; refusing")


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a tar(.gz) archive into ``dest`` after checking every member (:class:`UnsafeArchiveError`)."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            # The "data" filter (Python >= 3.12, and 3.8-3.11 security releases) is a second line of defence.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
    except (tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError) and not archive.exists():
            raise
        raise DownloadError(f"{archive} is not a valid tar archive: {type(err).__name__}: {err}") from err


def _dataset_folder(extracted: Path, name: str, archive: Path) -> Path:
    """The folder holding train/val/test inside the extracted tree (``NAME/`` in the official archives)."""
    for candidate in (extracted / name, extracted):
        if any((candidate / phase).is_dir() for phase in PHASES):
            return candidate
    subdirs = [p for p in extracted.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and any((subdirs[0] / phase).is_dir() for phase in PHASES):
        return subdirs[0]
    raise DownloadError(f"{archive} does not contain {name}/train, {name}/val or {name}/test folders")


def download_dataset(
    name: str,
    root: str | os.PathLike[str] = "datasets",
    url_base: str = OFFICIAL_URL_BASE,
    *,
    overwrite: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download official dataset ``name`` into ``root/name/{train,val,test}`` and return that folder.

    An existing ``root/name`` with a phase folder is reused unless ``overwrite``. The archive
    (``url_base + name + ".tar.gz"``) is removed after extraction.
    """
    if name == "cityscapes":
        raise ValueError(_CITYSCAPES)
    if name not in OFFICIAL_DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(OFFICIAL_DATASETS)} (and cityscapes, by hand)"
        )
    root = Path(root)
    target = root / name
    if target.exists():
        if not overwrite and any((target / phase).is_dir() for phase in PHASES):
            return target
        if not overwrite:
            raise FileExistsError(
                f"{target} exists but has no train/val/test folder; pass overwrite=True to replace it"
            )
    archive = download_file(
        f"{url_base.rstrip('/')}/{name}.tar.gz",
        root / f"{name}.tar.gz",
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        progress=progress,
    )
    try:
        with tempfile.TemporaryDirectory(prefix=f".extract-{name}-", dir=root) as tmp:
            safe_extract(archive, tmp)
            folder = _dataset_folder(Path(tmp), name, archive)
            if target.exists():
                shutil.rmtree(target)
            if folder == Path(tmp):  # phases at the archive's top level: move them, not the temp folder
                target.mkdir(parents=True)
                for child in folder.iterdir():
                    child.rename(target / child.name)
            else:
                folder.rename(target)
    finally:
        archive.unlink(missing_ok=True)
    return target
