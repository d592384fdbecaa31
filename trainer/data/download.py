"""Downloads and extracts Tiny ImageNet: `python -m trainer.data.download --dest DIR`.

Creates DIR/tiny-imagenet-200 (then train with
`--gin_bindings="DATA_DIR='DIR/tiny-imagenet-200'"`). Safe to interrupt and
rerun at any point:

- the archive is downloaded to DIR/tiny-imagenet-200.zip.part and a rerun
  resumes it with an HTTP Range request;
- its size and MD5 are checked before use (a bad file is moved aside to
  DIR/tiny-imagenet-200.zip.bad so the next run starts clean);
- it is extracted into the temporary DIR/tiny-imagenet-200.extracting/ and
  moved into place only once complete, so an interrupted extraction never
  looks like a dataset (a rerun removes the leftover and extracts again).

A zip fetched by hand can be put at DIR/tiny-imagenet-200.zip: it is
checked and extracted without downloading. The destination must be a local
directory; copy the result to Cloud Storage afterwards if needed.

Flags:
  --dest  local directory to put tiny-imagenet-200/ in; required.
  --url   where to download the zip (a mirror of the official archive).
  --size  expected size of the zip in bytes.
  --md5   expected MD5 of the zip.
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import hashlib
import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import zipfile
import zlib

from absl import flags

from trainer import cli
from trainer.data.sources import tiny_imagenet
from trainer.errors import UserError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SIZE = 248100043
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
NAME = "tiny-imagenet-200"
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 5.0
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   socket.timeout)


def _say(message):
    print(message, flush=True)


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def _is_complete(data_dir):
    try:
        tiny_imagenet.TinyImageNet(data_dir)
    except UserError:
        return False
    return True


def _network_error(url, zip_path, err):
    """The UserError for a failed download: what failed, what is kept, what to do."""
    part_path = zip_path + ".part"
    received = os.path.getsize(part_path) if os.path.exists(part_path) else 0
    kept = (f"The {_mb(received)} received so far are kept in '{part_path}' and a rerun resumes "
            "from there. " if received else "")
    return UserError(
        f"Could not download {url}: {err}. {kept}If the server is down or blocked, rerun with "
        "--url pointing at a "
        "mirror of the same file (with --size and --md5 if the mirror's copy differs), or "
        f"download the zip by hand and put it at '{zip_path}', then rerun this command to check "
        "and extract it.")


def _open(url, start, timeout):
    """Opens `url`, asking for the bytes from `start` on when `start` > 0."""
    request = urllib.request.Request(url, headers={"User-Agent": "trainer.data.download"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)  # pylint: disable=consider-using-with


def _resume_offset(response, start):
    """Where the response body starts in the file: `start` for a matching 206, else 0."""
    if start and response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        if content_range.startswith(f"bytes {start}-"):
            return start
        _say(f"The server sent an unexpected range ({content_range!r}); restarting from zero.")
    elif start:
        _say("The server does not resume downloads (it answered 200, not 206); "
             "restarting from zero.")
    return 0


def _fetch(url, part_path, size, timeout):
    """Downloads `url` into `part_path`, resuming it if it holds the first bytes."""
    start = os.path.getsize(part_path) if os.path.exists(part_path) else 0
    if start >= size:
        return  # Complete (or too long: the checks that follow will say so).
    if start:
        _say(f"Resuming the download of {url} at {_mb(start)} of {_mb(size)}.")
    else:
        _say(f"Downloading {url} ({_mb(size)}) to {part_path}.")
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416:
            raise
        _say("The server cannot resume from there (416); restarting from zero.")
        start, response = 0, _open(url, 0, timeout)
    with response:
        _save(response, part_path, _resume_offset(response, start), size)


def _save(response, part_path, offset, size):
    """Writes the response body into `part_path` from `offset` on, printing progress.

    Raises:
      ConnectionError: the body is shorter than its Content-Length (urllib
        reads a dropped connection as a short body).
    """
    length = response.headers.get("Content-Length")
    end = offset + int(length) if length and length.isdigit() else None
    done, last = offset, time.monotonic()
    with open(part_path, "ab" if offset else "wb") as f:
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            done += len(chunk)
            if time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                _say(f"  {_mb(done)} of {_mb(size)} ({100 * done / size:.0f}%)")
    if end is not None and done < end:
        raise ConnectionError(f"the connection closed after {done} of {end} bytes")
    _say(f"  {_mb(done)} of {_mb(size)} downloaded.")


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path, size, md5):
    """Checks size and MD5; moves a bad file aside (to `.bad`) and raises UserError."""
    got_size = os.path.getsize(path)
    problem = None
    if got_size != size:
        problem = f"expected {size} bytes, got {got_size}"
    else:
        got_md5 = _md5(path)
        if got_md5 != md5.lower():
            problem = f"expected MD5 {md5}, got {got_md5}"
    if problem:
        bad = os.path.join(os.path.dirname(path), f"{NAME}.zip.bad")
        os.replace(path, bad)
        raise UserError(
            f"The downloaded archive is not the expected file ({problem}). It was moved to "
            f"'{bad}' and the next run downloads it again from the start. If this keeps "
            "happening, the server may serve another file: use --url for a mirror, or --size "
            "and --md5 if that mirror's copy is known to differ.")


def _extract(zip_path, work_dir):
    """Extracts the archive's `tiny-imagenet-200/` into `work_dir`; returns its path there."""
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        if not any(m.filename.startswith(f"{NAME}/") for m in members):
            raise UserError(f"'{zip_path}' does not hold a '{NAME}/' folder: it is not the "
                            "Tiny ImageNet archive. Delete it and rerun this command.")
        _say(f"Extracting {len(members)} files to {work_dir} ...")
        for member in members:
            archive.extract(member, work_dir)  # zipfile drops absolute and '..' parts.
    return os.path.join(work_dir, NAME)


def _install(zip_path, work_dir, target):
    """Extracts into `work_dir`, then moves the complete tree to `target`.

    Raises:
      UserError: the zip cannot be read (corrupt although its size and MD5 matched what was given), or the
        destination cannot take the files (full, read-only): `work_dir` is removed first.
    """
    try:
        os.makedirs(os.path.join(work_dir, NAME))
        marker = os.path.join(work_dir, NAME, tiny_imagenet.INCOMPLETE_MARKER)
        with open(marker, "w", encoding="utf-8") as f:
            f.write("extraction in progress\n")
        extracted = _extract(zip_path, work_dir)
        os.remove(marker)
        tiny_imagenet.TinyImageNet(extracted)  # Raises if the archive lacked part of the layout.
        os.replace(extracted, target)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise UserError(f"'{zip_path}' is not a readable zip archive ({err}), although its size and MD5 are the "
                        "ones given: delete it and rerun this command to download it again (and check the --size "
                        "and --md5 given for it).") from None
    except OSError as err:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise UserError(f"Cannot extract '{zip_path}' into {os.path.dirname(work_dir)}: {err.strerror or err} "
                        f"({err.filename or work_dir}). Free some space there (the dataset takes about 0.5 GB) or "
                        "use another --dest, then rerun this command; the archive is kept.") from None
    shutil.rmtree(work_dir, ignore_errors=True)


def download(dest, url=URL, size=SIZE, md5=MD5, timeout=60):
    """Downloads, checks and extracts Tiny ImageNet into `dest/tiny-imagenet-200`.

    Args:
      dest: a local directory (created if needed).
      url: where to download the zip from (a mirror of the official archive).
      size: expected size of the zip in bytes.
      md5: expected MD5 of the zip (hex).
      timeout: seconds to wait for the server before giving up.

    Returns:
      The dataset directory, `dest/tiny-imagenet-200`.

    Raises:
      UserError: a remote `dest`, a network error, a wrong size or MD5, or a
        `dest/tiny-imagenet-200` that exists but is incomplete.
    """
    if "://" in dest:
        raise UserError(f"--dest must be a local directory, got '{dest}'. Download locally, then "
                        "copy the tiny-imagenet-200 folder to Cloud Storage (gsutil -m cp -r).")
    dest = os.path.abspath(os.path.expanduser(dest))
    target = os.path.join(dest, NAME)
    if os.path.exists(target):
        if _is_complete(target):
            _say(f"Tiny ImageNet is already complete in {target}; nothing to do.")
            return target
        raise UserError(f"'{target}' exists but is not a complete Tiny ImageNet (it was not "
                        "made by this command, which moves a dataset into place only when "
                        "complete). Move it away or delete it, then rerun this command.")
    os.makedirs(dest, exist_ok=True)
    work_dir = target + ".extracting"
    if os.path.exists(work_dir):
        _say(f"Removing {work_dir}, left by an interrupted extraction.")
        shutil.rmtree(work_dir)

    zip_path = target + ".zip"
    if not os.path.exists(zip_path):
        part_path = zip_path + ".part"
        try:
            _fetch(url, part_path, size, timeout)
        except _NETWORK_ERRORS as err:
            raise _network_error(url, zip_path, err) from None
        _verify(part_path, size, md5)
        os.replace(part_path, zip_path)
    else:
        _say(f"Checking {zip_path}.")
        _verify(zip_path, size, md5)
    _install(zip_path, work_dir, target)
    os.remove(zip_path)
    _say(f"Tiny ImageNet is ready in {target}. Train with --gin_bindings=\"DATA_DIR='{target}'\".")
    return target


def _define_flags():
    flags.DEFINE_string("dest", None, "Local directory to put tiny-imagenet-200/ in.",
                        required=True)
    flags.DEFINE_string("url", URL, "Where to download the zip (a mirror of the official archive).")
    flags.DEFINE_integer("size", SIZE, "Expected size of the zip in bytes.")
    flags.DEFINE_string("md5", MD5, "Expected MD5 of the zip.")


def main(argv):
    """Runs `download` with the flags."""
    del argv
    f = flags.FLAGS
    download(f.dest, url=f.url, size=f.size, md5=f.md5)


def run():
    """The command; its console script `tiny-download` runs this module as `python -m` does (trainer.cli)."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
