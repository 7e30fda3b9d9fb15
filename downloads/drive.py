"""A minimal Google Drive client for public files and folders: folder listings and large-file downloads.

Folders are listed from Drive's embedded folder view (one HTML page per folder: an entry per file
or sub-folder, with its id and title). A file comes from the download endpoint; large files first
get a "can't scan for viruses" page whose form names the real download address, which is then
fetched. Every request goes through `downloads.transfer` (mirror, retries, `.part` resume).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

from downloads.transfer import HtmlInsteadOfFile, download_part, read_page
from utils.errors import UserError

FOLDER_VIEW = "https://drive.google.com/embeddedfolderview?id={}"
FOLDER_PAGE = "https://drive.google.com/drive/folders/{}"
FILE_DOWNLOAD = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_FOLDER_LINK = re.compile(r"/drive/(?:u/\d+/)?folders/([\w-]+)")
_FILE_LINK = re.compile(r"/file/d/([\w-]+)")


@dataclass(frozen=True)
class DriveFile:
    path: str       # relative to the listed folder, "/"-separated
    file_id: str


class _FolderView(HTMLParser):
    """Entries of one embedded folder view page: (title, id, is_folder)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[str, str, bool]] = []
        self._link: tuple[str, bool] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            href = a["href"] or ""
            folder, file = _FOLDER_LINK.search(href), _FILE_LINK.search(href)
            self._link = (folder.group(1), True) if folder else (file.group(1), False) if file else None
        elif tag == "div" and "flip-entry-title" in (a.get("class") or "").split():
            self._in_title = True

    def handle_data(self, data: str) -> None:
        if self._in_title and self._link is not None and data.strip():
            self.entries.append((data.strip(), *self._link))
            self._in_title, self._link = False, None

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_title = False


def list_folder(folder_id: str, depth: int = 3) -> list[DriveFile]:
    """Every file in a public folder and its sub-folders (down to `depth` levels)."""
    view = _FolderView()
    view.feed(read_page(FOLDER_VIEW.format(folder_id)))
    found: list[DriveFile] = []
    for title, entry_id, is_folder in view.entries:
        if is_folder and depth > 0:
            found += [DriveFile(f"{title}/{f.path}", f.file_id) for f in list_folder(entry_id, depth - 1)]
        elif not is_folder:
            found.append(DriveFile(title, entry_id))
    return found


class _ConfirmForm(HTMLParser):
    """The action and hidden fields of the download confirmation form."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and self.action is None and a.get("action"):
            self.action = a["action"]
        elif tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"] or ""] = a.get("value") or ""


def confirmed_url(page: str) -> str | None:
    """The download address the confirmation page's form submits to, or None if the page has no form."""
    form = _ConfirmForm()
    form.feed(page)
    if form.action is None or "id" not in form.fields:
        return None
    return f"{form.action}?{urlencode(form.fields)}"


def download_file(file_id: str, dest: Path, folder_id: str) -> Path:
    """Fetch one Drive file into `<dest>.part` (resumable); returns the complete part."""
    url = FILE_DOWNLOAD.format(file_id)
    try:
        return download_part(url, dest)
    except HtmlInsteadOfFile as e:
        confirmed = confirmed_url(e.page)
        if confirmed is None:
            raise UserError(f"Google Drive did not serve {dest.name} ({url}): the file may be over its daily "
                            f"download quota; try again later, or download it by hand from "
                            f"{FOLDER_PAGE.format(folder_id)} to {dest}") from None
    try:
        return download_part(confirmed, dest)
    except HtmlInsteadOfFile:
        raise UserError(f"Google Drive did not serve {dest.name} ({confirmed}) after confirmation; try again "
                        f"later, or download it by hand from {FOLDER_PAGE.format(folder_id)} to {dest}") from None
