"""download.py against a loopback HTTP server (Range, cut connections, Drive folders); no test touches the internet."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import URLError
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch

import download
from downloads.checksums import Checksum
from downloads.sources import BACKBONES, DATASET_SOURCES, BackboneSource, published_row
from models import load_backbone, save_random_checkpoint
from tests.test_datasets import quadrants
from downloads import transfer
from utils.errors import UserError
from utils.io import download_record

ROOT = Path(__file__).resolve().parents[1]
TINY_URL = "https://dl.fbaipublicfiles.com/test/random_tiny.pth"


@dataclass
class Site:
    """What the loopback server serves: files by path (query ignored), pages, cuts and fixed statuses."""
    files: dict[str, bytes] = field(default_factory=dict)
    html: dict[str, str] = field(default_factory=dict)          # path?query -> page
    cuts: dict[str, list[int]] = field(default_factory=dict)    # path -> bytes sent by successive responses
    status: dict[str, int] = field(default_factory=dict)        # path -> HTTP status
    ranges: bool = True                                         # False: Range headers are ignored
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path?query, Range header)
    headers: list[dict[str, str]] = field(default_factory=list)  # request headers of confirmed Drive downloads
    clock: list[float] = field(default_factory=lambda: [0.0])  # the fake clock retries wait on


class Handler(BaseHTTPRequestHandler):
    site: Site

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        site, path = self.site, urlsplit(self.path).path
        site.requests.append((self.path, self.headers.get("Range")))
        if path in site.status:
            self.send_error(site.status[path])
        elif self.path in site.html:
            self._send(200, site.html[self.path].encode(), {"Content-Type": "text/html; charset=utf-8"})
        elif path == "/uc":   # Google Drive: a large file answers with its confirmation page (and a cookie)
            file_id = parse_qs(urlsplit(self.path).query)["id"][0]
            self._send(200, confirm_page(file_id).encode(), {"Content-Type": "text/html; charset=utf-8",
                                                            "Set-Cookie": f"download_warning_{file_id}=t; Path=/"})
        elif path == "/download":   # the form's address: the file once confirmed
            query = parse_qs(urlsplit(self.path).query)
            site.headers.append(dict(self.headers))
            self._serve(f"/drive/{query['id'][0]}")
        else:
            self._serve(path)

    def _serve(self, path: str) -> None:
        if path not in self.site.files:
            self.send_error(404)
            return
        body, start = self.site.files[path], 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "") if self.site.ranges else None
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        cuts = self.site.cuts.get(path)
        sent = cuts.pop(0) if cuts else None
        self._send(206 if match else 200, body[start:], headers, sent)

    def _send(self, code: int, body: bytes, headers: dict[str, str], cut_after: int | None = None) -> None:
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body if cut_after is None else body[:cut_after])
        if cut_after is not None:  # the connection drops midway
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


def drive_id(tag: str) -> str:
    """A Drive-shaped id (Drive's are 33 characters; gdown reads 25 or more) that starts with `tag`."""
    return (tag + "_" + "x" * 33)[:33]


def confirm_page(file_id: str) -> str:
    """Drive's current "can't scan for viruses" page: a search form first, then `#download-form`, whose
    action already carries a query."""
    return ('<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>\n'
            '<form action="https://drive.google.com/search" method="get"><input type="hidden" name="q" value="x">'
            '</form>\n'
            '<div class="uc-main"><div id="uc-text"><p class="uc-warning-caption">Google Drive can\'t scan this file '
            'for viruses.</p></div>\n'
            '<form id="download-form" action="https://drive.usercontent.google.com/download?authuser=0" '
            'method="get"><input type="submit" id="uc-download-link" value="Download anyway">'
            f'<input type="hidden" name="id" value="{file_id}"><input type="hidden" name="export" value="download">'
            '<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="abc-123">'
            '</form></div></body></html>')


QUOTA_PAGE = ('<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>\n'
              '<div class="uc-main"><div id="uc-text">\n'
              '<p class="uc-error-caption">Sorry, you can&#39;t view or download this file at this time.</p>\n'
              '<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please '
              'try accessing the file again later.</p>\n</div></div></body></html>')


def folder_page(title: str, entries: list[tuple[str, str, bool]]) -> str:
    """Drive's embedded folder view: one flip-entry per (title, id, is_folder)."""
    items = "".join(
        f'<div class="flip-entry" id="entry-{i}"><div class="flip-entry-info">'
        f'<a href="https://drive.google.com/{"drive/folders/" + i if folder else "file/d/" + i + "/view?usp=drive_web"}"'
        f' target="_blank"><div class="flip-entry-visual"><img src="x.png"></div>'
        f'<div class="flip-entry-title">{name}</div></a>'
        f'</div><div class="flip-entry-last-modified"><div>Oct 11, 2023</div></div></div>'
        for name, i, folder in entries)
    return f'<!DOCTYPE html><html><head><title>{title}</title></head><body><div class="flip-entries">{items}</div>' \
           f'</body></html>'


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch):
    """A threaded server on 127.0.0.1 that every download reaches through CAUSE_DOWNLOAD_MIRROR."""
    state = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"site": state}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv(transfer.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    clock = state.clock
    monkeypatch.setattr(transfer, "_clock", lambda: clock[0])
    monkeypatch.setattr(transfer, "_sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("release") / "random_vit_tiny_8.pth"
    save_random_checkpoint("random_vit_tiny_8", path)
    return path.read_bytes()


@pytest.fixture
def tiny_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table entry of a tiny backbone the models can load (the real ones are hundreds of MB)."""
    monkeypatch.setitem(BACKBONES, "random_vit_tiny_8", BackboneSource("random_tiny.pth", TINY_URL, 1))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = download.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one `error: ...` line of stderr (after any progress bars), checked to be the last and only one."""
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and err.count("error:") == 1, err
    return last


# ---------------------------------------------------------------- mirror and plain transfers

def test_mirror_replaces_scheme_and_host_only(monkeypatch):
    monkeypatch.setenv(transfer.MIRROR_ENV, "http://10.0.0.5:8080")
    assert transfer.mirrored("https://dl.fbaipublicfiles.com/dino/a/b.pth?x=1&y=2") == \
        "http://10.0.0.5:8080/dino/a/b.pth?x=1&y=2"
    monkeypatch.setenv(transfer.MIRROR_ENV, "10.0.0.5:8080/mirror")
    with pytest.raises(UserError, match="CAUSE_DOWNLOAD_MIRROR"):
        transfer.mirrored("https://example.org/a")
    monkeypatch.delenv(transfer.MIRROR_ENV)
    assert transfer.mirrored("https://example.org/a") == "https://example.org/a"


def test_complete_backbone_is_the_release_byte_for_byte(site, tiny_entry, tiny_backbone, tmp_path, capsys):
    site.files["/test/random_tiny.pth"] = tiny_backbone
    code, out, _ = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 0
    final = tmp_path / "random_vit_tiny_8.pth"
    assert final.read_bytes() == tiny_backbone and not (tmp_path / "random_vit_tiny_8.pth.part").exists()
    record = json.loads((tmp_path / "random_vit_tiny_8.json").read_text())
    assert record["sha256"] == hashlib.sha256(tiny_backbone).hexdigest() and record["url"] == TINY_URL
    assert f"next: ckpt={final} bash run" in out
    assert load_backbone(final).embed_dim == 192


def test_resume_after_a_cut_connection(site, tiny_entry, tiny_backbone, tmp_path, capsys):
    cut = len(tiny_backbone) // 3
    site.files["/test/random_tiny.pth"] = tiny_backbone
    site.cuts["/test/random_tiny.pth"] = [cut]
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 0 and "retrying in 1 s" in err
    assert [r for _, r in site.requests] == [None, f"bytes={cut}-"]   # the retry continues, never restarts
    assert (tmp_path / "random_vit_tiny_8.pth").read_bytes() == tiny_backbone


def test_a_second_run_continues_the_part_file(site, tiny_entry, tiny_backbone, tmp_path, capsys):
    saved = len(tiny_backbone) // 2
    site.files["/test/random_tiny.pth"] = tiny_backbone
    (tmp_path / "random_vit_tiny_8.pth.part").write_bytes(tiny_backbone[:saved])
    assert run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))[0] == 0
    assert [r for _, r in site.requests] == [f"bytes={saved}-"]
    assert (tmp_path / "random_vit_tiny_8.pth").read_bytes() == tiny_backbone


def test_a_part_holding_the_whole_file_is_finished_without_a_transfer(site, tiny_entry, tiny_backbone, tmp_path,
                                                                      capsys):
    site.files["/test/random_tiny.pth"] = tiny_backbone
    (tmp_path / "random_vit_tiny_8.pth.part").write_bytes(tiny_backbone)    # stopped before verify and rename
    assert run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))[0] == 0
    assert site.requests == [("/test/random_tiny.pth", f"bytes={len(tiny_backbone)}-")]   # answered 416
    assert (tmp_path / "random_vit_tiny_8.pth").read_bytes() == tiny_backbone


def test_a_part_that_does_not_fit_starts_over(site, tmp_path):
    site.files["/a.bin"] = b"0123456789"
    (tmp_path / "a.bin.part").write_bytes(b"0123456789abc")                 # longer than the file: 416
    part = transfer.download_part("https://example.org/a.bin", tmp_path / "a.bin", progress=False)
    assert part.read_bytes() == b"0123456789" and [r for _, r in site.requests] == ["bytes=13-", None]
    site.ranges, site.requests[:] = False, []
    part.write_bytes(b"0123")                                               # a server that ignores Range
    assert transfer.download_part("https://example.org/a.bin", tmp_path / "a.bin", progress=False) == part
    assert part.read_bytes() == b"0123456789" and len(site.requests) == 1


def test_truncated_backbone_is_refused(site, tiny_entry, tiny_backbone, tmp_path, capsys):
    site.files["/test/random_tiny.pth"] = tiny_backbone[: len(tiny_backbone) - 1000]  # complete transfer, bad file
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 2
    assert error_line(err).startswith(f"error: {TINY_URL}: the downloaded file does not load as random_vit_tiny_8")
    assert list(tmp_path.iterdir()) == []          # neither the file nor its part is left


def test_present_verified_file_is_skipped_and_a_changed_one_refused(site, tiny_entry, tiny_backbone, tmp_path,
                                                                    capsys):
    site.files["/test/random_tiny.pth"] = tiny_backbone
    assert run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))[0] == 0
    site.requests.clear()
    code, out, _ = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 0 and "already present and verified" in out and site.requests == []
    final = tmp_path / "random_vit_tiny_8.pth"
    changed = bytearray(tiny_backbone)
    changed[len(changed) // 2] ^= 0xFF
    final.write_bytes(changed)
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 2 and "sha256 mismatch" in error_line(err) and site.requests == []
    assert final.read_bytes() == changed                               # never overwritten


def test_a_file_placed_by_hand_is_verified_and_recorded(site, tiny_entry, tiny_backbone, tmp_path, capsys):
    (tmp_path / "random_vit_tiny_8.pth").write_bytes(tiny_backbone)
    code, out, _ = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 0 and "not downloaded by this tool" in out and site.requests == []
    assert json.loads((tmp_path / "random_vit_tiny_8.json").read_text())["sha256"] == \
        hashlib.sha256(tiny_backbone).hexdigest()


@pytest.mark.parametrize("status, words", [(404, "HTTP 404 Not Found: nothing is at this address"),
                                           (403, "HTTP 403 Forbidden: access denied")])
def test_404_and_403_are_not_retried(site, tiny_entry, tmp_path, capsys, status, words):
    site.status["/test/random_tiny.pth"] = status
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 2 and error_line(err).startswith(f"error: {TINY_URL}: {words}")
    assert len(site.requests) == 1 and list(tmp_path.iterdir()) == []


def test_retries_give_up_within_a_minute(site, tmp_path):
    site.status["/busy.bin"] = 503
    with pytest.raises(UserError, match=r"https://example\.org/busy\.bin: HTTP 503 .*gave up after \d+ s"):
        transfer.download_part("https://example.org/busy.bin", tmp_path / "busy.bin", progress=False)
    assert 1 < len(site.requests) and site.clock[0] < 60


def test_a_broken_file_placed_by_hand_is_refused(site, tiny_entry, tmp_path, capsys):
    (tmp_path / "random_vit_tiny_8.pth").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 2 and "exists but does not load as random_vit_tiny_8" in error_line(err)
    assert (tmp_path / "random_vit_tiny_8.pth").read_bytes() == b"not a checkpoint" and site.requests == []


def test_disk_full_keeps_the_part_for_the_next_run(site, tmp_path, monkeypatch):
    site.files["/f.bin"] = b"y" * 3000

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transfer, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(UserError, match=r"https://example\.org/f\.bin: disk full while writing .*f\.bin\.part"):
        transfer.download_part("https://example.org/f.bin", tmp_path / "f.bin", progress=False)
    assert len(site.requests) == 1   # not retried


def test_cuts_that_make_progress_never_exhaust_the_retries(site, tmp_path):
    body = bytes(range(256)) * 100
    site.files["/flaky.bin"] = body
    site.cuts["/flaky.bin"] = [1000] * 30                    # every response dies after 1000 bytes
    part = transfer.download_part("https://example.org/flaky.bin", tmp_path / "flaky.bin", progress=False)
    assert part.read_bytes() == body and len(site.requests) == 26
    assert site.clock[0] == 25                                # each try progressed: the wait stayed at 1 s


def test_gated_backbone_says_how_to_get_it(capsys):
    code, _, err = run(capsys, "backbone", "dinov3_vit_base_16")
    assert code == 2 and "gated" in error_line(err) and "--url" in err


def test_dns_failure_and_full_disk_are_one_line(monkeypatch, tmp_path, site):
    def no_dns(*args, **kwargs):
        raise URLError(socket.gaierror(-2, "Name or service not known"))
    with monkeypatch.context() as m:
        m.setattr(transfer._OPENER, "open", no_dns)
        with pytest.raises(UserError, match=r"https://example\.org/a\.zip: cannot resolve the host 127\.0\.0\.1"):
            transfer.download_part("https://example.org/a.zip", tmp_path / "a.zip", progress=False)
    site.files["/big.bin"] = b"x" * 5000
    monkeypatch.setattr(transfer.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(UserError, match=r"https://example\.org/big\.bin: not enough disk space"):
        transfer.download_part("https://example.org/big.bin", tmp_path / "big.bin", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_web_page_is_not_taken_for_the_file(site, tmp_path):
    site.html["/file.zip"] = "<html>please log in</html>"
    with pytest.raises(UserError, match="sent a web page instead of the file"):
        transfer.download_part("https://example.org/file.zip", tmp_path / "file.zip", progress=False)


# ---------------------------------------------------------------- datasets

def cityscapes_zip(members: dict[str, bytes] | None = None) -> bytes:
    """STEGO's cityscapes.zip in miniature: one top folder, one train and one val image with labels."""
    def png(array: np.ndarray) -> bytes:
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()
    label = np.full((16, 16), 7 + 2, np.uint8)          # label id 9 -> class 2
    files = members or {
        f"cityscapes/leftImg8bit/{s}/bonn/bonn_{s}_leftImg8bit.png": png(quadrants(16, 16)) for s in ("train", "val")}
    if members is None:
        files |= {f"cityscapes/gtFine/{s}/bonn/bonn_{s}_gtFine_labelIds.png": png(label) for s in ("train", "val")}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_dataset_unpacks_into_the_layout_and_crops(site, tmp_path, capsys):
    site.files["/stego-public/pytorch_data/cityscapes.zip"] = cityscapes_zip()
    code, out, _ = run(capsys, "dataset", "cityscapes", "--data_dir", str(tmp_path), "--num_workers", "0")
    assert code == 0 and "next: python train_mediator.py --dataset cityscapes" in out
    from loader.dataloader import get_dataset
    assert get_dataset("cityscapes", tmp_path, "val", 8)[0]["label"].unique().tolist() == [2]
    assert len(get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")) == 5
    # archive removed, no temp folder; the download record says no checksum is published (the CRC was checked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cityscapes", "cityscapes.json"]
    assert json.loads((tmp_path / "cityscapes.json").read_text())["published_checksum"] is None
    assert "no published checksum to check" in out
    site.requests.clear()
    code, out, _ = run(capsys, "dataset", "cityscapes", "--data_dir", str(tmp_path), "--crop", "false")
    assert code == 0 and "already present" in out and site.requests == []


def test_corrupt_zip_is_refused_with_nothing_unpacked(site, tmp_path, capsys):
    good = cityscapes_zip({"cityscapes/a.txt": b"A" * 4000, "cityscapes/b.txt": b"B" * 4000})
    bad = bytearray(good)
    bad[good.index(b"B" * 100) + 50] ^= 0xFF   # one flipped byte inside b.txt's data
    site.files["/stego-public/pytorch_data/cityscapes.zip"] = bytes(bad)
    code, _, err = run(capsys, "dataset", "cityscapes", "--data_dir", str(tmp_path), "--crop", "false")
    assert code == 2 and "CRC mismatch in cityscapes/b.txt" in err and "nothing was unpacked" in err
    assert list(tmp_path.iterdir()) == []


def test_archive_entries_outside_the_top_folder_are_refused(site, tmp_path, capsys):
    site.files["/stego-public/pytorch_data/potsdam.zip"] = cityscapes_zip({"potsdam/a.txt": b"a",
                                                                            "potsdam/../../evil.txt": b"x"})
    code, _, err = run(capsys, "dataset", "potsdam", "--data_dir", str(tmp_path / "data"))
    assert code == 2 and "unexpected entry 'potsdam/../../evil.txt'" in error_line(err)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "potsdam").exists()


def voc_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in {"VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"x\n", "._VOCdevkit": b"mac"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VOC_PATH = "/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"


def test_voc_tarball_lands_under_pascalvoc(site, tmp_path, capsys, monkeypatch):
    tarball = voc_tarball()
    md5 = hashlib.md5(tarball).hexdigest()
    monkeypatch.setitem(DATASET_SOURCES, "pascalvoc",   # the tiny tarball's md5 in place of the published one
                        dataclasses.replace(DATASET_SOURCES["pascalvoc"], checksum=Checksum("md5", md5, "test")))
    site.files[VOC_PATH] = tarball
    code, out, _ = run(capsys, "dataset", "pascalvoc", "--data_dir", str(tmp_path), "--crop", "false",
                       "--keep_archive", "true")
    assert code == 0 and "left out 1 entries outside VOCdevkit/ (e.g. ._VOCdevkit)" in out
    assert f"md5 {md5} matches the published {md5} (test)" in out
    assert not (tmp_path / "pascalvoc" / "._VOCdevkit").exists()
    assert (tmp_path / "pascalvoc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_bytes() == b"x\n"
    assert (tmp_path / "VOCtrainval_11-May-2012.tar").is_file()
    record = json.loads((tmp_path / "pascalvoc" / "VOCdevkit.json").read_text())
    assert record["published_checksum"] == {"algorithm": "md5", "expected": md5, "actual": md5, "published_by": "test"}


def test_voc_tarball_with_another_md5_is_removed_naming_both(site, tmp_path, capsys):
    tarball = voc_tarball()
    site.files[VOC_PATH] = tarball
    code, _, err = run(capsys, "dataset", "pascalvoc", "--data_dir", str(tmp_path), "--crop", "false")
    line = error_line(err)
    assert code == 2 and "md5 mismatch: expected 6cd6e144f989b92b3379bac3b3de84fd" in line
    assert f"got {hashlib.md5(tarball).hexdigest()}" in line and "the file was removed" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == []   # neither the archive nor its part nor the folder


def test_backbone_published_checksum_checked_logged_and_recorded(site, tiny_backbone, tmp_path, capsys, monkeypatch):
    md5 = hashlib.md5(tiny_backbone).hexdigest()
    monkeypatch.setitem(BACKBONES, "random_vit_tiny_8",   # a release that prints the first 6 digits of its md5
                        BackboneSource("random_tiny.pth", TINY_URL, 1, checksum=Checksum("md5", md5[:6], "its README")))
    site.files["/test/random_tiny.pth"] = tiny_backbone
    code, out, _ = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    assert code == 0 and f"md5 {md5} matches the published {md5[:6]} (its README)" in out
    record = json.loads((tmp_path / "random_vit_tiny_8.json").read_text())
    assert record["published_checksum"] == {"algorithm": "md5", "expected": md5[:6], "actual": md5,
                                            "published_by": "its README"}


def test_backbone_with_another_sha256_is_removed_naming_both(site, tiny_backbone, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(BACKBONES, "random_vit_tiny_8", BackboneSource(
        "random_tiny-00000000.pth", TINY_URL, 1, checksum=Checksum("sha256", "00000000", "the file name")))
    site.files["/test/random_tiny.pth"] = tiny_backbone
    code, _, err = run(capsys, "backbone", "random_vit_tiny_8", "--dest", str(tmp_path))
    line = error_line(err)
    assert code == 2 and "sha256 mismatch: expected 00000000 (published by the file name)" in line
    assert f"got {hashlib.sha256(tiny_backbone).hexdigest()}" in line
    assert list(tmp_path.iterdir()) == []


def test_published_checksums_in_the_table():
    """The values the releases publish: torchvision's VOC md5, the MAE README's md5 prefix, and the sha256
    prefix each DINOv3 file name carries."""
    assert DATASET_SOURCES["pascalvoc"].checksum.expected == "6cd6e144f989b92b3379bac3b3de84fd"
    assert (BACKBONES["mae_vit_base_16"].checksum.algorithm, BACKBONES["mae_vit_base_16"].checksum.expected) == \
        ("md5", "8cad7c")
    assert {n: b.checksum.expected for n, b in BACKBONES.items() if n.startswith("dinov3")} == {
        "dinov3_vit_small_16": "08c60483", "dinov3_vit_small_plus_16": "4057cbaa",
        "dinov3_vit_base_16": "73cec8be", "dinov3_vit_large_16": "8aa4cbdd"}
    assert all(BACKBONES[n].checksum.algorithm == "sha256" for n in BACKBONES if n.startswith("dinov3"))
    assert BACKBONES["dino_vit_base_8"].checksum is None   # DINO publishes none: the strict load checks it


# ---------------------------------------------------------------- published heads (Google Drive)

def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_published_row_lands_where_the_test_script_looks(site, tmp_path, capsys):
    row = published_row("cocostuff27", "dino_vit_base_8", "TR")
    segment = saved({"head.f1.weight": torch.ones(90, 768, 1, 1)})
    cluster = saved({"codebook": torch.zeros(2048, 768), "cluster_probe": torch.ones(27, 90)})
    codebook = io.BytesIO()
    np.save(codebook, np.arange(6, dtype=np.float32).reshape(2, 3))
    seg, segm, sub, clu, mod = (drive_id(t) for t in ("SEG", "SEGM", "SUB", "CLU", "MOD"))
    site.html[f"/embeddedfolderview?id={row.head_folder}"] = folder_page(
        "Seg Head Parameter", [("segment_tr.pth", seg, False), ("segment_mlp.pth", segm, False), ("more", sub, True)])
    site.html[f"/embeddedfolderview?id={sub}"] = folder_page("more", [("cluster_tr.pth", clu, False)])
    site.html[f"/embeddedfolderview?id={row.clusterbook_folder}"] = folder_page(
        "Concept ClusterBook", [("modular.npy", mod, False)])
    site.files |= {f"/drive/{seg}": segment, f"/drive/{clu}": cluster, f"/drive/{mod}": codebook.getvalue()}
    out_dir = tmp_path / "CAUSE"
    code, out, _ = run(capsys, "published", "--dataset", "cocostuff27", "--ckpt", "dino_vit_base_8", "--structure",
                       "TR", "--output_dir", str(out_dir), "--data_dir", str(tmp_path / "data"),
                       "--ckpt_dir", str(tmp_path / "checkpoint"))
    assert code == 0
    assert (out_dir / "cocostuff27/dino_vit_base_8/2048/segment_tr.pth").read_bytes() == segment
    assert (out_dir / "cocostuff27/dino_vit_base_8/2048/cluster_tr.pth").read_bytes() == cluster
    assert (out_dir / "cocostuff27/modularity/dino_vit_base_8/2048/modular.npy").read_bytes() == codebook.getvalue()
    # gdown read #download-form (not the search form before it), kept the action's own query, and the
    # bytes came with a browser User-Agent and the cookie the confirmation page set
    confirmed = [path for path, _ in site.requests if path.startswith("/download?")]
    assert len(confirmed) == 3 and all("authuser=0" in q and "uuid=abc-123" in q for q in confirmed)
    assert all(h["User-Agent"].startswith("Mozilla/5.0") and "download_warning_" in h.get("Cookie", "")
               for h in site.headers)
    for placed in ("dino_vit_base_8/2048/segment_tr.pth", "dino_vit_base_8/2048/cluster_tr.pth",
                   "modularity/dino_vit_base_8/2048/modular.npy"):  # recognised later as published downloads
        record = download_record(out_dir / "cocostuff27" / placed)
        assert record is not None and record["published"] == "cocostuff27 dino_vit_base_8 CAUSE-TR"
    assert out.rstrip().splitlines()[-3:] == [
        f"python download.py backbone dino_vit_base_8 --dest {tmp_path / 'checkpoint'}",
        f"python download.py dataset cocostuff --data_dir {tmp_path / 'data'}",
        f"python test_tr.py --dataset cocostuff27 --data_dir {tmp_path / 'data'} --ckpt "
        f"{tmp_path / 'checkpoint' / 'dino_vit_base_8.pth'} --output_dir {out_dir}"]


def test_published_file_missing_from_the_folder_names_it(site, tmp_path, capsys):
    row = published_row("cityscapes", "dino_vit_small_8", "MLP")
    site.html[f"/embeddedfolderview?id={row.head_folder}"] = folder_page("h", [("readme.txt", drive_id("R"), False)])
    site.html[f"/embeddedfolderview?id={row.clusterbook_folder}"] = folder_page("c", [])
    code, _, err = run(capsys, "published", "--dataset", "cityscapes", "--ckpt", "checkpoint/dino_vit_small_8.pth",
                       "--structure", "MLP", "--output_dir", str(tmp_path))
    assert code == 2 and "hold no segment_mlp.pth (found: readme.txt)" in error_line(err)


def test_drive_refusal_names_the_folder_and_the_path(site, tmp_path, capsys):
    row = published_row("pascalvoc", "mae_vit_base_16", "TR")
    q = drive_id("Q")
    site.html[f"/embeddedfolderview?id={row.head_folder}"] = folder_page("h", [("segment_tr.pth", q, False)])
    site.html[f"/embeddedfolderview?id={row.clusterbook_folder}"] = folder_page("c", [])
    site.html[f"/uc?id={q}"] = QUOTA_PAGE   # Drive's refusal, no form to follow
    code, _, err = run(capsys, "published", "--dataset", "pascalvoc", "--ckpt", "mae_vit_base_16", "--structure", "TR",
                       "--output_dir", str(tmp_path))
    line = error_line(err)
    assert code == 2 and line.startswith("error: Google Drive did not serve segment_tr.pth")
    assert "Drive says: Too many users have viewed or downloaded this file recently." in line   # its own words
    assert f"https://drive.google.com/drive/folders/{row.head_folder}" in line
    assert str(tmp_path / "pascalvoc" / "mae_vit_base_16" / "2048" / "segment_tr.pth") in line


def test_drive_folder_that_does_not_list_is_one_line(site, tmp_path, capsys):
    row = published_row("cityscapes", "dino_vit_base_8", "TR")
    site.status["/embeddedfolderview"] = 404   # a folder made private or removed
    code, _, err = run(capsys, "published", "--dataset", "cityscapes", "--ckpt", "dino_vit_base_8", "--structure",
                       "TR", "--output_dir", str(tmp_path))
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: https://drive.google.com/drive/folders/{row.head_folder}: "
                                         f"Google Drive did not list the folder (")
    assert "status code 404" in line


# ---------------------------------------------------------------- list

def readme_table_rows(page: str, heading: str) -> list[list[str]]:
    """Cells of the body rows of the first table under the heading `heading` of the docs page `page`."""
    lines = (ROOT / "docs" / page).read_text().split(f"\n## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]


LISTED_ROW = re.compile(r"--dataset (\S+) +--ckpt (\S+) +--structure (\S+) .*published mIoU (\S+), pAcc (\S+)$")


def test_list_shows_every_readme_row_without_network(capsys, monkeypatch):
    monkeypatch.setattr(transfer._OPENER, "open", lambda *a, **k: pytest.fail("list made a network request"))
    code, out, _ = run(capsys, "list")
    assert code == 0
    families = {"DINO": "dino", "DINOv2": "dinov2", "iBOT": "ibot", "MSN": "msn", "MAE": "mae"}
    sizes = {"S": "small", "B": "base"}
    datasets = {"COCO-Stuff": "cocostuff27", "Cityscapes": "cityscapes", "Pascal VOC": "pascalvoc",
                "COCO-81": "coco81", "COCO-171": "coco171"}
    expected = set()
    for dataset, method, backbone, miou, pacc, _ in readme_table_rows("reproduce.md", "The published results"):
        family, size, patch = re.fullmatch(r"(\w+) ViT-(\w)/(\d+)", backbone).groups()
        expected.add((datasets[dataset], f"{families[family]}_vit_{sizes[size]}_{patch}", method.split("-")[1],
                      miou, pacc))
    listed = {m.groups() for line in out.splitlines() if (m := LISTED_ROW.search(line))}
    assert len(expected) == 30 and listed == expected
    backbones = [name for cells in readme_table_rows("backbones.md", "Backbone checkpoints")
                 for name in re.findall(r"`(\w+)\.pth`", cells[0])]
    assert len(backbones) >= 10
    for name in backbones + list(DATASET_SOURCES):
        assert re.search(rf"^  {name} ", out, re.M), name


def test_official_addresses():
    assert BACKBONES["dino_vit_base_8"].url == \
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    assert BACKBONES["dinov2_vit_large_14"].url == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert BACKBONES["msn_vit_small_16"].url == "https://dl.fbaipublicfiles.com/msn/vits16_800ep.pth.tar"
    assert BACKBONES["mae_vit_base_16"].url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    assert DATASET_SOURCES["potsdam"].url == \
        "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/potsdam.zip"


# ---------------------------------------------------------------- tar extraction without filters (3.10.0-3.10.11, 3.11.0-3.11.3)

def tar_of(entries: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info in entries:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size = kind, mode, link, 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.fixture
def no_tar_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile as on Python 3.11.0-3.11.3: extractall has no `filter` argument."""
    extractall = tarfile.TarFile.extractall

    def old_extractall(self, path=".", members=None, *, numeric_owner=False, **kwargs):
        if kwargs:
            raise TypeError(f"extractall() got an unexpected keyword argument '{next(iter(kwargs))}'")
        return extractall(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    monkeypatch.delattr(tarfile, "data_filter")


def test_tar_without_filters_unpacks_with_the_data_checks_by_hand(no_tar_filters, tmp_path):
    from downloads.archives import unpack
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_of([tar_entry("top/run.sh", mode=0o6777), tar_entry("top/sub", tarfile.DIRTYPE, 0o777),
                                tar_entry("top/sub/link", tarfile.SYMTYPE, link="../run.sh")]))
    unpack(archive, "top", tmp_path / "out")
    assert (tmp_path / "out/run.sh").stat().st_mode & 0o7777 == 0o755    # no set-uid/set-gid, no group/other write
    assert (tmp_path / "out/sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out/sub/link").read_bytes() == b"xxx"


@pytest.mark.parametrize("entry, words", [
    (tar_entry("top/evil", tarfile.SYMTYPE, link="../../outside"), "link 'top/evil' points outside its folder"),
    (tar_entry("top/abs", tarfile.SYMTYPE, link="/etc/passwd"), "link 'top/abs' points outside its folder"),
    (tar_entry("top/fifo", tarfile.FIFOTYPE), "entry 'top/fifo' is a device or pipe"),
])
def test_tar_without_filters_refuses_what_the_data_filter_refuses(no_tar_filters, tmp_path, entry, words):
    from downloads.archives import unpack
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_of([tar_entry("top/ok.txt"), entry]))
    with pytest.raises(UserError, match=re.escape(words)):
        unpack(archive, "top", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside").exists()


@pytest.fixture(params=["tarfile's filter", "no tar filters"])
def tar_filters(request: pytest.FixtureRequest) -> None:
    """Each test runs twice: with tarfile's own "data" filter, and as on Pythons without extraction filters."""
    if request.param == "no tar filters":
        request.getfixturevalue("no_tar_filters")


def test_a_chain_of_links_cannot_write_outside(tar_filters, tmp_path):
    """`a -> ..`, `a/b -> ..`, `a/b/c -> ..`: each link's text stays inside, but through the links before it
    `a/b/c/x.txt` would land two folders above the destination."""
    from downloads.archives import unpack
    archive = tmp_path / "chain.tar"
    archive.write_bytes(tar_of([tar_entry("top/ok.txt"), tar_entry("top/a", tarfile.SYMTYPE, link=".."),
                                tar_entry("top/a/b", tarfile.SYMTYPE, link=".."),
                                tar_entry("top/a/b/c", tarfile.SYMTYPE, link=".."), tar_entry("top/a/b/c/x.txt")]))
    dest = tmp_path / "data" / "out"
    dest.parent.mkdir()
    with pytest.raises(UserError, match=r"chain\.tar: (link 'top/a/b' points outside|'top/a/b' would link to)") as e:
        unpack(archive, "top", dest)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["chain.tar", "data"]   # nothing written anywhere


def test_a_link_redirected_by_a_later_entry_is_refused_before_the_move(tar_filters, tmp_path):
    """`x -> d/../../z` resolves inside while `d` does not exist; `d -> .` (inside) then makes it point outside
    the unpacked folder: the links are checked again, before the folder is moved into place."""
    from downloads.archives import unpack
    archive = tmp_path / "later.tar"
    archive.write_bytes(tar_of([tar_entry("top/x", tarfile.SYMTYPE, link="d/../../z"),
                                tar_entry("top/d", tarfile.SYMTYPE, link=".")]))
    with pytest.raises(UserError, match=r"later\.tar: link 'x' points outside its folder"):
        unpack(archive, "top", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_refused_tarball_is_one_line_from_download(site, tmp_path, capsys, monkeypatch):
    """tarfile's own filter refuses the chain (LinkOutsideDestinationError): the user reads one line."""
    tarball = tar_of([tar_entry("VOCdevkit/a", tarfile.SYMTYPE, link=".."),
                      tar_entry("VOCdevkit/a/b", tarfile.SYMTYPE, link=".."), tar_entry("VOCdevkit/a/b/x.txt")])
    monkeypatch.setitem(DATASET_SOURCES, "pascalvoc", dataclasses.replace(DATASET_SOURCES["pascalvoc"], checksum=None))
    site.files[VOC_PATH] = tarball
    code, _, err = run(capsys, "dataset", "pascalvoc", "--data_dir", str(tmp_path), "--crop", "false")
    line = error_line(err)
    assert code == 2 and "Traceback" not in err and "'VOCdevkit/a/b' would link to" in line
    assert "tarfile's \"data\" filter refuses it" in line
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "pascalvoc" / "VOCdevkit").exists()
