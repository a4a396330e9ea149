"""The controller's own files, read and written safely.

Reading: what an operator names (an inventory, a runbook, a plan file, an exported journal) may be anything a
path can name. `read_regular` reads only a regular file, and at most a given number of bytes: `/dev/zero` would
fill the memory, a named pipe would wait forever for a writer, a directory is no document.

Writing: what Overhaul keeps (the journal, the runs' logs, saved plans) holds command output, host facts and
the shape of the farm: it is nobody else's to read. Files are created 0600 from the start (never created
readable and tightened afterwards) and folders 0700, whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from overhaul.errors import ConfigError

FILE_MODE = 0o600
DIR_MODE = 0o700

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def amount(size: int, whole: bool = False) -> str:
    """`size` bytes for a message: '812 bytes', '3.5 KB', '5.0 MB' ('5 MB' with `whole`, when it is exact)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            if whole and size % scale == 0:
                return f"{size // scale} {unit}"
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a file")


def _refuse_unless_regular(path: Path, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise ConfigError([f"{path}: not a regular file ({_kind(mode)}); expected {what} in a regular file"])


def read_regular(path: Path | str, limit: int, what: str = "a document") -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; else a ConfigError naming the file.

    `what` says what was expected ("a saved plan", "an inventory or runbook"), for the messages. Anything but a regular file is
    refused before it is opened (opening a device may do something) and again after, on what was opened
    (the path may have changed in between); it is opened non-blocking, so that a named pipe put there in
    between never waits for a writer. Never more than `limit` + 1 bytes are read, whatever the size said.
    An OSError (no such file, permission denied) is left to the caller, which knows how to word it.
    """
    path = Path(path)
    _refuse_unless_regular(path, os.stat(path).st_mode, what)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb", buffering=0) as stream:
        info = os.fstat(stream.fileno())
        _refuse_unless_regular(path, info.st_mode, what)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = stream.read(min(limit + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > limit:
        raise ConfigError([f"{path}: the file is {amount(max(info.st_size, got))}; {what} may be at most "
                           f"{amount(limit, whole=True)}"])
    return b"".join(chunks)


def tighten(path: Path | str, mode: int) -> None:
    """Take away from an existing file or folder of ours any permission beyond `mode` (made by an older
    Overhaul, or under a looser umask). Someone else's, or a missing one, is left as it is."""
    with contextlib.suppress(OSError):
        info = os.stat(path)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & ~mode:
            os.chmod(path, stat.S_IMODE(info.st_mode) & mode)


def private_dir(path: Path | str, *, tighten_existing: bool = False) -> Path:
    """Make the folder `path` and any missing parent of it 0700 (whatever the umask); returns `path`.

    A folder that already exists is not changed unless `tighten_existing` (for a folder that is Overhaul's
    own, such as `.overhaul/runs`: never for one the operator named, which may be their home or /tmp).
    """
    path = Path(path)
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made at the same moment by another run: its maker set its mode
        os.chmod(folder, DIR_MODE)  # (mkdir's mode is masked by the umask)
    if tighten_existing and not missing:
        tighten(path, DIR_MODE)
    return path


def create_private(path: Path | str) -> None:
    """Make sure `path` exists, created 0600 if it did not (an existing one of ours is tightened to 0600)."""
    try:  # (read-only, and only if missing: a journal on a read-only disk still opens for reading)
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(descriptor, FILE_MODE)  # (as created, the umask may have taken the owner's write away)
        finally:
            os.close(descriptor)
    except FileExistsError:
        tighten(path, FILE_MODE)


def write_private(path: Path | str, data: str | bytes | Iterable[str]) -> None:
    """Write `path` whole (text, bytes, or lines of text), 0600 from the start, atomically: a reader (or a crash)
    sees the old file or the new one, never a part. Missing parent folders are made 0700."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):  # (replacing /dev/stdout or a pipe would be no write to it)
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise ConfigError([f"{path}: not a regular file ({_kind(mode)}); Overhaul writes only regular files"])
    private_dir(path.parent)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(descriptor, "wb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                for part in [data] if isinstance(data, str) else data:
                    out.write(part.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def append_private(path: Path | str, text: str) -> None:
    """Append `text` to `path`, creating it 0600 (and any missing folder 0700); a file of ours that is looser
    (an older Overhaul's) is tightened first."""
    path = Path(path)
    private_dir(path.parent)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(descriptor, "a") as out:
        if stat.S_IMODE(os.fstat(descriptor).st_mode) & ~FILE_MODE:
            with contextlib.suppress(OSError):
                os.fchmod(descriptor, FILE_MODE)
        out.write(text)


def last_lines(path: Path, lines: int, window: int = 16384) -> list[str]:
    """The last `lines` non-blank lines of a text file (a pair's log), read from its end only."""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - window))
        tail = file.read().decode(errors="replace")
    return [line for line in tail.splitlines() if line.strip()][-lines:]
