"""Google Drive through gdown, which is maintained against Drive's page changes.

gdown reads the folder listings (its embedded-folder-view parser) and the large-file "can't scan
for viruses" page (its `#download-form` reader, the form action's own query merged in, and Drive's
`uc-error-subcaption` text when Drive refuses). The bytes come through `downloads.transfer`, with a
browser User-Agent and a cookie jar as gdown sends them: $CAUSE_DOWNLOAD_MIRROR, retries and the
`.part` resume stay ours. gdown's own requests follow the mirror too (`_requests_mirrored`).

gdown is imported when Drive is first asked for something, not before: the torch.hub entries and everything
else that downloads nothing load without it. Its confirmation-page reader,
`gdown.download.get_url_from_gdrive_confirmation`, is an internal helper (gdown has no public call that
gives the confirmed URL); requirements.txt pins the gdown versions tested with it (GDOWN_TESTED), and a
gdown without it is one line naming the versions to install.
"""
from __future__ import annotations

import contextlib
import html
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from downloads.transfer import HtmlInsteadOfFile, Retryable, download_part, mirrored, with_retries
from utils.errors import UserError

FOLDER_PAGE = "https://drive.google.com/drive/folders/{}"
FILE_DOWNLOAD = "https://drive.google.com/uc?id={}"   # gdown's address; a large file answers with a form first
GDOWN_TESTED = ">=6.5.1,<6.6"   # as requirements.txt pins it
BROWSER_AGENT = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_10_1) AppleWebKit/537.36 (KHTML, like Gecko) "
                 "Chrome/39.0.2171.95 Safari/537.36")   # gdown's file-download agent


@dataclass(frozen=True)
class DriveFile:
    path: str       # relative to the listed folder, "/"-separated
    file_id: str


def _gdown() -> ModuleType:
    try:
        import gdown
    except ImportError:
        raise UserError(f"the published CAUSE heads come from Google Drive through gdown, which is not installed: "
                        f"pip install 'gdown{GDOWN_TESTED}'") from None
    return gdown


def _confirmation_reader() -> Callable[[str], str]:
    """gdown's reader of Drive's "can't scan for viruses" page (page text -> the file's URL)."""
    gdown = _gdown()
    try:
        from gdown.download import get_url_from_gdrive_confirmation
    except ImportError:
        raise UserError(f"gdown {getattr(gdown, '__version__', '?')} has no gdown.download."
                        f"get_url_from_gdrive_confirmation, the internal helper that reads Google Drive's confirmation "
                        f"page (tested with gdown{GDOWN_TESTED}): pip install 'gdown{GDOWN_TESTED}'") from None
    return get_url_from_gdrive_confirmation


@contextlib.contextmanager
def _requests_mirrored() -> Iterator[None]:
    """Every `requests` call gdown makes inside the block goes to $CAUSE_DOWNLOAD_MIRROR like ours (gdown
    opens its own sessions, so the rewrite sits on `requests.Session.send` for the block's duration)."""
    import requests

    send = requests.Session.send

    def send_mirrored(self, request, **kwargs):
        request.url = mirrored(request.url)
        return send(self, request, **kwargs)

    requests.Session.send = send_mirrored
    try:
        yield
    finally:
        requests.Session.send = send


def list_folder(folder_id: str) -> list[DriveFile]:
    """Every file in a public folder and its sub-folders, listed by gdown (nothing is downloaded)."""
    page = FOLDER_PAGE.format(folder_id)
    gdown = _gdown()
    import requests   # gdown's own dependency

    found: list[list[DriveFile]] = []

    def attempt() -> None:
        try:
            with _requests_mirrored():
                entries = gdown.download_folder(id=folder_id, skip_download=True, quiet=True, use_cookies=False)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise Retryable(f"cannot read the folder ({type(e).__name__})") from None
        except gdown.DownloadError as e:
            raise UserError(f"{page}: Google Drive did not list the folder ({_one_line(str(e))})") from None
        found.append([DriveFile(e.path.replace("\\", "/"), e.id) for e in entries])

    with_retries(page, attempt)
    return found[0]


def _one_line(text: str) -> str:
    """Drive's message as plain text on one line (tags dropped, entities decoded)."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def download_file(file_id: str, dest: Path, folder_id: str) -> Path:
    """Fetch one Drive file into `<dest>.part` (resumable); returns the complete part. When Drive answers
    with a page, gdown reads its confirmation form; a refusal ends in one line with Drive's own words."""
    url = FILE_DOWNLOAD.format(file_id)
    by_hand = f"download it by hand from {FOLDER_PAGE.format(folder_id)} to {dest}"
    for _ in range(2):   # the file, or its confirmation page and then the file
        try:
            return download_part(url, dest, agent=BROWSER_AGENT)
        except HtmlInsteadOfFile as e:
            read_confirmation, gdown = _confirmation_reader(), _gdown()
            try:
                url = read_confirmation(e.page)
            except gdown.FileURLRetrievalError as refusal:
                raise UserError(f"Google Drive did not serve {dest.name} ({e.url}): Drive says: "
                                f"{_one_line(str(refusal))} Try again later, or {by_hand}") from None
    raise UserError(f"Google Drive did not serve {dest.name} ({url}) after confirmation; try again later, or "
                    f"{by_hand}")
