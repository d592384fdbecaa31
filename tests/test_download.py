"""Tests for trainer.data.download against a local HTTP server (127.0.0.1 only)."""

import hashlib
import http.server
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile

import pytest

from trainer.data import download as dl
from trainer.data import synthetic
from trainer.data.sources.tiny_imagenet import DatasetNotFoundError, TinyImageNet
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(scope="module")
def data_zip(tmp_path_factory):
    """(bytes, size, md5) of a small archive laid out like the official zip."""
    root = tmp_path_factory.mktemp("zip_src")
    synthetic.write_synthetic(str(root / "tiny-imagenet-200"), num_classes=2, per_class=3,
                              val_per_class=1, test_images=1, image_size=8)
    path = shutil.make_archive(str(root / "archive"), "zip", root_dir=root,
                               base_dir="tiny-imagenet-200")
    with open(path, "rb") as f:
        payload = f.read()
    return payload, len(payload), hashlib.md5(payload).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the payload at /tiny-imagenet-200.zip, honouring `Range: bytes=N-` if enabled."""

    def do_GET(self):  # pylint: disable=invalid-name
        server = self.server
        payload, byte_range = server.payload, self.headers.get("Range")
        if self.path != "/tiny-imagenet-200.zip":
            server.log.append((self.path, byte_range, 404, 0))
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1)) if byte_range else 0
        if start >= len(payload):
            server.log.append((self.path, byte_range, 416, 0))
            self.send_error(416)
            return
        if start and server.honour_range:
            status, body = 206, payload[start:]
        else:
            status, body = 200, payload
        server.log.append((self.path, byte_range, status, len(body)))
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after:  # Simulates a dropped connection.
            self.wfile.write(body[:server.cut_after])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # Keep test output quiet.
        pass


@pytest.fixture
def server(data_zip, monkeypatch):
    """A local server of the fixture zip; `.log` lists (path, Range, status, bytes) per request."""
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload, httpd.log, httpd.honour_range, httpd.cut_after = data_zip[0], [], True, 0
    httpd.url = f"http://127.0.0.1:{httpd.server_port}/tiny-imagenet-200.zip"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def _download(dest, server, data_zip, **overrides):
    _, size, md5 = data_zip
    args = dict(url=server.url, size=size, md5=md5, timeout=10)
    args.update(overrides)
    return dl.download(str(dest), **args)


def test_full_download_then_nothing_to_do(tmp_path, server, data_zip, capsys):
    target = _download(tmp_path, server, data_zip)
    assert target == str(tmp_path / "tiny-imagenet-200")
    ds = TinyImageNet(target)
    assert ds.num_classes == 2 and len(ds.files("train")[0]) == 6
    assert os.listdir(tmp_path) == ["tiny-imagenet-200"]  # No zip, .part or temp dir left.
    assert server.log == [("/tiny-imagenet-200.zip", None, 200, data_zip[1])]
    assert _download(tmp_path, server, data_zip) == target
    assert "already complete" in capsys.readouterr().out
    assert len(server.log) == 1


def test_checksum_mismatch_is_a_user_error_and_next_run_starts_clean(tmp_path, server, data_zip):
    with pytest.raises(UserError, match=f"expected MD5 {'0' * 32}, got {data_zip[2]}") as info:
        _download(tmp_path, server, data_zip, md5="0" * 32)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200.zip.bad"]
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert [entry[1] for entry in server.log] == [None, None]  # The rerun did not resume.


def test_size_mismatch(tmp_path, server, data_zip):
    size = data_zip[1]
    with pytest.raises(UserError, match=f"expected {size + 1} bytes, got {size}"):
        _download(tmp_path, server, data_zip, size=size + 1)


def test_partial_download_resumes_with_a_range_request(tmp_path, server, data_zip):
    payload, size, _ = data_zip
    half = size // 2
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(payload[:half])
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert server.log == [("/tiny-imagenet-200.zip", f"bytes={half}-", 206, size - half)]


def test_dropped_connection_is_a_user_error_and_the_rerun_resumes(tmp_path, server, data_zip):
    server.cut_after = 1000
    with pytest.raises(UserError, match="received so far are kept in .*part' and a rerun resumes"):
        _download(tmp_path, server, data_zip)
    assert os.path.getsize(tmp_path / "tiny-imagenet-200.zip.part") == 1000
    server.cut_after = 0
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert [entry[1:3] for entry in server.log] == [(None, 200), ("bytes=1000-", 206)]


def test_unsatisfiable_range_restarts_from_zero(tmp_path, server, data_zip):
    payload, size, _ = data_zip
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(payload + b"junk")
    with pytest.raises(UserError, match=f"expected {size + 100} bytes, got {size}"):
        _download(tmp_path, server, data_zip, size=size + 100)  # A mirror with another size.
    assert [entry[1:3] for entry in server.log] == [(f"bytes={size + 4}-", 416), (None, 200)]


def test_server_without_range_support_restarts_from_zero(tmp_path, server, data_zip):
    server.honour_range = False
    # Bytes that would corrupt the file if the download appended to them.
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(b"x" * 100)
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert server.log == [("/tiny-imagenet-200.zip", "bytes=100-", 200, data_zip[1])]


def test_interrupted_extraction_is_never_a_dataset(tmp_path, server, data_zip, monkeypatch):
    real_extract = zipfile.ZipFile.extract
    members = len(zipfile.ZipFile(io.BytesIO(data_zip[0])).infolist())
    calls = []

    def extract_then_die(self, member, path=None, pwd=None):  # Dies on the very last file.
        calls.append(member)
        if len(calls) == members:
            raise KeyboardInterrupt
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        _download(tmp_path, server, data_zip)
    leftovers = [str(p) for p in tmp_path.rglob("*") if p.is_dir()] + [str(tmp_path)]
    for directory in leftovers:
        with pytest.raises(DatasetNotFoundError):
            TinyImageNet(directory)
    with pytest.raises(DatasetNotFoundError, match="partially written"):
        TinyImageNet(str(tmp_path / "tiny-imagenet-200.extracting" / "tiny-imagenet-200"))

    monkeypatch.undo()
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert os.listdir(tmp_path) == ["tiny-imagenet-200"]
    assert len(server.log) == 1  # The verified zip was reused, not downloaded again.


def test_zip_put_there_by_hand_is_used(tmp_path, server, data_zip):
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(data_zip[0])
    TinyImageNet(_download(tmp_path, server, data_zip))
    assert server.log == []


def test_unreachable_server_suggests_a_mirror(tmp_path, server, data_zip):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # Closed when the block ends: nothing listens there.
    url = f"http://127.0.0.1:{port}/tiny-imagenet-200.zip"
    with pytest.raises(UserError) as info:
        _download(tmp_path, server, data_zip, url=url)
    message = str(info.value)
    assert url in message and "--url" in message and "\n" not in message
    assert str(tmp_path / "tiny-imagenet-200.zip") in message


def test_http_error_is_a_user_error(tmp_path, server, data_zip):
    with pytest.raises(UserError, match="404"):
        _download(tmp_path, server, data_zip, url=server.url.replace(".zip", ".tar"))


def test_refuses_remote_or_foreign_destinations(tmp_path, server, data_zip):
    with pytest.raises(UserError, match="local directory"):
        dl.download("gs://bucket/data")
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("n1\n")
    with pytest.raises(UserError, match="exists but is not a complete"):
        _download(tmp_path, server, data_zip)
    assert server.log == []


def test_command_line(tmp_path, server, data_zip):
    _, size, md5 = data_zip
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.data.download", f"--dest={tmp_path}", f"--url={server.url}",
         f"--size={size}", f"--md5={md5}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Downloading" in done.stdout and "Tiny ImageNet is ready" in done.stdout
    TinyImageNet(str(tmp_path / "tiny-imagenet-200"))
    failed = subprocess.run(
        [sys.executable, "-m", "trainer.data.download", f"--dest={tmp_path / 'other'}",
         f"--url={server.url}", f"--size={size}", "--md5=" + "f" * 32],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "error: The downloaded archive is not the expected file" in failed.stderr
    assert "Traceback" not in failed.stderr


def _corrupt(payload):
    """The archive with its central directory overwritten: its size is kept, zipfile cannot read it."""
    return payload[:-100] + b"\0" * 100


def test_corrupt_zip_whose_size_and_md5_were_given_is_one_line_and_leaves_nothing(tmp_path, server, data_zip):
    bad = _corrupt(data_zip[0])
    zip_path = tmp_path / "tiny-imagenet-200.zip"
    zip_path.write_bytes(bad)
    with pytest.raises(UserError) as info:
        _download(tmp_path, server, data_zip, size=len(bad), md5=hashlib.md5(bad).hexdigest())
    message = str(info.value)
    assert message.startswith(f"'{zip_path}' is not a readable zip archive") and "\n" not in message
    assert "delete it and rerun this command" in message
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200.zip"]  # No .extracting left behind.
    os.remove(zip_path)
    TinyImageNet(_download(tmp_path, server, data_zip))  # The fix works.


def _mount_tmpfs(path, options):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_during_extraction_is_one_line_and_leaves_nothing(tmp_path, server, data_zip):
    dest = tmp_path / "small"
    _mount_tmpfs(dest, f"size={len(data_zip[0]) + 8192}")  # Room for the zip, not for the files too.
    try:
        (dest / "tiny-imagenet-200.zip").write_bytes(data_zip[0])
        with pytest.raises(UserError) as info:
            _download(dest, server, data_zip)
        message = str(info.value)
        assert message.startswith(f"Cannot extract '{dest / 'tiny-imagenet-200.zip'}' into {dest}: No space left on "
                                  "device") and "Free some space there" in message and "\n" not in message
        assert sorted(os.listdir(dest)) == ["tiny-imagenet-200.zip"]
    finally:
        subprocess.run(["umount", str(dest)], check=False)
