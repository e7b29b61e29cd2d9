"""Which paths a reader may open: regular files only, never a FIFO, device, socket, dangling link or link loop.

``open()`` on a FIFO blocks until a writer appears, and a device or socket is no input at all, so every reader of
a path named by a manifest, a question file or a folder walk checks it here first and raises a typed error that a
batch job records (``errors.jsonl``, ``files.jsonl``) before it goes on. Links to regular files are followed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import InvalidInputError

LINK_TO_FOLDER = "is a symbolic link to a folder (not followed)"

_KINDS = ((stat.S_ISDIR, "is a folder, not a file"), (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
          (stat.S_ISCHR, "is a character device, not a regular file"),
          (stat.S_ISBLK, "is a block device, not a regular file"), (stat.S_ISSOCK, "is a socket, not a regular file"))


def _mode_reason(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((why for test, why in _KINDS if test(mode)), "is not a regular file")


def not_regular_reason(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file a reader may open (links followed), or None when it is one.

    Only ``stat`` is called: nothing is opened, so a FIFO or a device is never touched.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a dangling symbolic link (its target does not exist)" if os.path.islink(path) else "file not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return _mode_reason(st.st_mode)


def check_regular_file(path: str | Path, error: type[InvalidInputError] = InvalidInputError,
                       missing_ok: bool = False) -> Path:
    """``path`` as a Path when it is (a link to) a regular file; else raises ``error(path, reason)``.

    With ``missing_ok`` a path with no entry at all passes, so the reader reports "not found" in its own words; a
    dangling link or a link loop is still refused.
    """
    if missing_ok and not os.path.lexists(path):
        return Path(path)
    reason = not_regular_reason(path)
    if reason:
        raise error(path, reason)
    return Path(path)


def open_regular(path: str | Path, error: type[InvalidInputError] = InvalidInputError):
    """Open a regular file for binary reading; anything else raises ``error`` and is never left blocking.

    The check is made twice: ``stat`` before opening (a device is not even opened), then ``fstat`` on what was
    opened, without blocking, so a file swapped for a FIFO in between is refused too.
    """
    check_regular_file(path, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(path, f"cannot be opened ({e.strerror or type(e).__name__})") from e
    try:
        reason = _mode_reason(os.fstat(fd).st_mode)
        if reason:
            raise error(path, reason)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file ignores the flag; readers expect ordinary semantics
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def walk_entries(root: str | Path) -> list[tuple[Path, str | None]]:
    """Every entry under the folder ``root`` that is not itself a folder, sorted by path: ``(path, None)`` for a
    regular file (or a link to one), ``(path, reason)`` for anything else (FIFO, device, socket, dangling link, link
    loop, a sub-folder that cannot be listed, and :data:`LINK_TO_FOLDER` for a link to a folder).

    Links to folders are listed, not followed (as ``Path.rglob`` does), so a link cycle cannot make the walk endless.
    """
    out: list[tuple[Path, str | None]] = []
    todo = [Path(root)]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            out.append((folder, f"folder cannot be listed ({e.strerror or type(e).__name__})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir:
                todo.append(path)
            elif entry.is_symlink() and os.path.isdir(path):
                out.append((path, LINK_TO_FOLDER))
            else:
                out.append((path, not_regular_reason(path)))
    return sorted(out, key=lambda e: str(e[0]))
