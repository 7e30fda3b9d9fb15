"""HTTP transfers that survive cut connections: `<name>.part` files resumed with Range, bounded retries.

Every URL goes through `mirrored`: with ``CAUSE_DOWNLOAD_MIRROR=http://HOST:PORT`` the scheme and
host of each request are replaced (path and query kept), for sites with an internal mirror and for
the tests. A transfer writes `<dest>.part` and never touches `dest`: the caller checks the complete
part (length here; CRC or a strict load there) and renames it into place.
"""
from __future__ import annotations

import errno
import http.client
import os
import shutil
import socket
import sys
import time
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import HTTPCookieProcessor, Request, build_opener

from tqdm import tqdm

from utils.errors import UserError

MIRROR_ENV = "CAUSE_DOWNLOAD_MIRROR"
CHUNK = 1 << 20
TIMEOUT_S = 15.0  # per connect / read: a server silent this long counts as a cut connection
# Retries stop once this many seconds pass without progress: with the backoff and the timeout, the last
# try ends within a minute of the first failure.
RETRY_BUDGET_S = 40.0
RETRIED_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "CAUSE-download/1"
_clock, _sleep = time.monotonic, time.sleep  # replaced by a fake clock in the tests
_OPENER = build_opener(HTTPCookieProcessor(CookieJar()))  # cookies a site sets (Drive's confirmation) are sent back


class Retryable(Exception):
    """A transient failure (cut connection, timeout, server busy): the transfer is tried again."""


class RangeRefused(UserError):
    """HTTP 416: nothing to send from the offset asked for; `total` is the file's length when the server says."""

    def __init__(self, message: str, total: int | None):
        super().__init__(message)
        self.total = total


class HtmlInsteadOfFile(UserError):
    """The server sent a web page where a file was expected (a confirmation page, a login wall)."""

    def __init__(self, url: str, page: str):
        super().__init__(f"{url}: the server sent a web page instead of the file (a login or confirmation "
                         f"page?); open the URL in a browser to see why")
        self.url, self.page = url, page


def mirrored(url: str) -> str:
    """`url` with the scheme and host of $CAUSE_DOWNLOAD_MIRROR, when it is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    m = urlsplit(mirror)
    if m.scheme not in ("http", "https") or not m.netloc or m.path not in ("", "/") or m.query:
        raise UserError(f"{MIRROR_ENV}={mirror!r}: expected a scheme and host only, e.g. http://HOST:PORT")
    u = urlsplit(url)
    return urlunsplit((m.scheme, m.netloc, u.path, u.query, ""))


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def http_error(url: str, e: HTTPError) -> Exception:
    """Retryable for a busy server, else a UserError saying what the status means and what to do."""
    if e.code in RETRIED_HTTP:
        return Retryable(f"HTTP {e.code} {e.reason}")
    if e.code == 416:  # Content-Range: bytes */TOTAL
        total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        return RangeRefused(f"{url}: HTTP 416: the server cannot resume from the saved part",
                            int(total) if total.isdigit() else None)
    if e.code == 404:
        return UserError(f"{url}: HTTP 404 Not Found: nothing is at this address any more; check the address "
                         f"in `python download.py list` and docs/backbones.md or docs/data.md, or fetch the file by hand")
    if e.code in (401, 403):
        return UserError(f"{url}: HTTP {e.code} {e.reason}: access denied (an expired or gated link, or a "
                         f"download quota); get a fresh link from the project page and pass it with --url")
    return UserError(f"{url}: HTTP {e.code} {e.reason}: the server refused the request")


def _open(url: str, headers: dict[str, str], agent: str = USER_AGENT):
    """The response to GET `url` (through the mirror); UserError or Retryable on failure."""
    request = Request(mirrored(url), headers={"User-Agent": agent, **headers})
    try:
        return _OPENER.open(request, timeout=TIMEOUT_S)
    except HTTPError as e:
        raise http_error(url, e) from None
    except URLError as e:
        if isinstance(e.reason, socket.gaierror):
            host = urlsplit(mirrored(url)).hostname
            raise UserError(f"{url}: cannot resolve the host {host} (no network or DNS); check the connection, "
                            f"or set {MIRROR_ENV}=http://HOST:PORT to use a mirror") from None
        raise Retryable(f"cannot connect ({e.reason})") from None
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise Retryable(f"cannot connect ({type(e).__name__}: {e})") from None


def with_retries(url: str, attempt: Callable[[], object]) -> None:
    """Call `attempt` until it finishes without Retryable.

    Waits 1, 2, 4, ... s between tries; gives up once RETRY_BUDGET_S pass without progress (a cut
    transfer that saved more bytes than the previous one restarts the clock).
    """
    stalled_since, tries, progress = None, 0, None
    while True:
        try:
            attempt()
            return
        except Retryable as e:
            now, done = _clock(), getattr(e, "saved", None)
            if stalled_since is None or (done is not None and progress is not None and done > progress):
                stalled_since, tries = now, 0
            progress = done
            left = RETRY_BUDGET_S - (now - stalled_since)
            if left <= 0:
                raise UserError(f"{url}: {e}; gave up after {now - stalled_since:.0f} s of retries without "
                                f"progress. Run the same command again: it resumes from what was saved") from None
            delay = min(2.0 ** tries, left)
            print(f"{url}: {e}; retrying in {delay:.0f} s", file=sys.stderr, flush=True)
            _sleep(delay)
            tries += 1


class _Cut(Retryable):
    """A transfer cut short after `saved` bytes are in the part file."""

    def __init__(self, message: str, saved: int):
        super().__init__(message)
        self.saved = saved


def download_part(url: str, dest: Path, progress: bool = True, agent: str = USER_AGENT) -> Path:
    """Fetch `url` into `<dest>.part`, continuing what an earlier run saved there; returns the complete part.

    `dest` itself is never written. Complete means: as long as the server's Content-Length (or
    Content-Range total) says. HTTP 404/403, DNS failures and a full disk stop at once with one line.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    with_retries(url, lambda: _transfer(url, part, progress, agent))
    return part


def _transfer(url: str, part: Path, progress: bool, agent: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, {"Range": f"bytes={have}-"} if have else {}, agent)
    except RangeRefused as e:
        if e.total == have:  # the part already holds the whole file (an earlier run stopped before the rename)
            return
        part.unlink()
        raise Retryable("the saved part does not match the file on the server; starting over") from None
    with response:
        if response.headers.get("Content-Type", "").startswith("text/html"):
            raise HtmlInsteadOfFile(url, response.read(1 << 20).decode("utf-8", "replace"))
        start, total = _extent(response, have)
        if start == 0 and have:
            print(f"{url}: the server does not resume; starting over", file=sys.stderr, flush=True)
        if total is not None:
            _require_space(url, part, total - start)
        _copy(url, response, part, start, total, progress)
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Cut(f"connection closed after {size} of {total} bytes", size)
    if total is not None and size > total:
        part.unlink()
        raise UserError(f"{url}: received {size} bytes where the server announced {total}; the partial file "
                        f"was removed, run the same command again")


def _extent(response, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, total file length or None) of a 200 or 206 response."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")   # bytes START-END/TOTAL
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            start = int(span.split("-")[0])
        except (IndexError, ValueError):
            raise Retryable(f"unreadable Content-Range {content_range!r}") from None
        if start != have:
            raise Retryable(f"the server resumed at byte {start}, not {have}")
        return start, None if total == "*" else int(total)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _require_space(url: str, part: Path, needed: int) -> None:
    free = shutil.disk_usage(part.parent).free
    if needed > free:
        raise UserError(f"{url}: not enough disk space in {part.parent}: {needed / 1e9:.2f} GB needed, "
                        f"{free / 1e9:.2f} GB free; free some space (or pick another folder) and run again")


def _copy(url: str, response, part: Path, start: int, total: int | None, progress: bool) -> None:
    """Body of `response` into `part` from byte `start` (earlier bytes kept)."""
    with open(part, "r+b" if start and part.exists() else "wb") as f, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-len(".part")],
                 disable=not progress, file=sys.stderr) as bar:
        f.seek(start)
        f.truncate()
        while True:
            try:
                chunk = response.read(CHUNK)
            except (TimeoutError, OSError, ValueError, http.client.HTTPException) as e:
                raise _Cut(f"connection cut ({type(e).__name__})", f.tell()) from None
            if not chunk:
                return
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise UserError(f"{url}: disk full while writing {part}; free some space and run again: "
                                    f"it resumes from the bytes already saved") from None
                raise UserError(f"{url}: cannot write {part} ({e.strerror})") from None
            bar.update(len(chunk))

