"""Noticing that the config file changed: inotify on its directory, stat polling as the fallback.

Editors and configuration management replace the file by renaming a temporary file over it,
which kills a watch on the file itself, so the *directory* is watched and events are kept only
when they name the config file. Every call also compares a cheap stat signature of the file, so a
lost event (or no inotify at all) costs at most one call. pyinotify is used here and nowhere else,
to add and remove watches; the events are read raw (see `_drain` for why).

A file is reported only when it looks complete: after its writer closed it (IN_CLOSE_WRITE), and
never between a truncating open and the write that follows (an in-place `cat new > config`),
which would load an empty, valid config and drop every rule. A change seen by stat alone must
look the same for STAT_SETTLE seconds (a writer can be preempted between the truncation and its
event), and an empty file for the writer's grace. `matches()` tells the daemon whether the file
it then read is still the one reported (it may have changed again in between).

Single-threaded use: the daemon calls `changed()` when `fileno()` is readable and on every tick.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import struct
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from portwatch.text import escape

__all__ = ["ConfigWatcher"]

# Kernel ABI (<sys/inotify.h>); stable, so no need to ask pyinotify for them.
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

# Events about a name in the directory that mean "the file is different now". MOVED_FROM and
# DELETE mean it is gone; the daemon reports that and keeps the last good config.
_CHANGED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_ATTRIB | IN_MOVED_FROM | IN_DELETE
# IN_CREATE and IN_MODIFY are not changes but "being written": a new regular file is empty, and
# a truncated or half-written one incomplete, until its writer closes it (IN_CLOSE_WRITE
# follows). IN_CREATE is also how a new symlink or hard link, which gets no CLOSE_WRITE, is seen.
_NAME_EVENTS = _CHANGED | IN_CREATE | IN_MODIFY
# Events about the directory itself: its watch is dead (or points elsewhere) and must be re-armed.
_DIR_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
_DIR_MASK = _NAME_EVENTS | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR

_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_MAX_EVENT = _EVENT_HEADER.size + 256  # name is at most NAME_MAX + NUL, padded
_READ_SIZE = 65536
_MAX_READS = 16  # per call, so a busy directory cannot stall the daemon's loop
# How long a writer may keep the file open before we stop waiting for its CLOSE_WRITE and trust
# stat alone (a process that never closes it must not freeze the config forever).
WRITER_GRACE = 5.0  # seconds
# How long a change seen by stat alone must stay the same before it is trusted (the daemon polls
# every 0.5 s, so a polled change is reported at the second look).
STAT_SETTLE = 0.4  # seconds

# ("file", dev, ino, size, mtime_ns, ctime_ns, mode), ("missing",) or ("error", errno).
# ctime is included because chown/chmod and an in-place rewrite that restores mtime
# (cp -p, touch -r) change nothing else; the user cannot set it.
_Signature = tuple[object, ...]

_pyinotify: ModuleType | None = None


def _load_pyinotify() -> ModuleType:
    """Import pyinotify once, quietly: raises ImportError (or anything its import raises)."""
    global _pyinotify  # noqa: PLW0603 - a cache of one import
    if _pyinotify is None:
        with warnings.catch_warnings():
            # pyinotify 0.9.6 imports asyncore, which warns on 3.11 (and comes from pyasyncore
            # on 3.12+); the warning is about pyinotify's code, not ours.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            import pyinotify  # noqa: PLC0415 - lazy: polling mode must not need it

        # At import pyinotify attaches its own stderr StreamHandler to its logger; drop it so
        # anything it logs goes through the application's logging like everything else.
        logger = logging.getLogger("pyinotify")
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
        _pyinotify = pyinotify
    return _pyinotify


def _errno_text(exc: BaseException) -> str:
    """The reason behind a pyinotify failure: errno text from its ctypes call, else its message."""
    code = ctypes.get_errno()  # pyinotify's libc calls use use_errno=True; reset before them
    return os.strerror(code) if code else str(exc)


def _signature(path: Path) -> _Signature:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return ("missing",)
    except OSError as exc:
        return ("error", exc.errno)
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _being_written(path: Path) -> bool:
    """After IN_CREATE: is this a fresh regular file whose writer has not closed it yet?

    A new symlink or hard link (st_nlink > 1) is complete when created; a new regular file with
    one link is still being written and will be followed by IN_CLOSE_WRITE.
    """
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


class ConfigWatcher:
    """Tell the daemon when the config file may have changed; `changed()` never blocks."""

    def __init__(self, path: str, *, use_inotify: bool = True, writer_grace: float = WRITER_GRACE) -> None:
        self._path = Path(path).absolute()
        self._writer_grace = writer_grace
        self._writing_since: float | None = None  # a writer has the file open since then
        self._mode = "polling"
        self._reason: str | None = None
        self._wm: Any = None  # pyinotify.WatchManager while inotify is in use
        self._fd: int | None = None
        self._dirs: dict[str, int] = {}  # watched directory -> wd
        self._names: dict[int, set[bytes]] = {}  # wd -> file names that matter in it
        self._complete = False  # every wanted directory is watched
        if use_inotify:
            self._reason = self._start_inotify()
            if self._reason is None:
                self._mode = "inotify"
        # Taken after the watches exist, so no change can fall between the two.
        self._sig = _signature(self._path)
        self._settling: tuple[_Signature, float] | None = None  # a stat change and when first seen

    @property
    def mode(self) -> str:
        """Either "inotify" or "polling"."""
        return self._mode

    @property
    def fallback_reason(self) -> str | None:
        """Why polling was chosen despite use_inotify=True (one line); None otherwise."""
        return self._reason

    def fileno(self) -> int | None:
        """The inotify fd, readable while events are pending; None when polling."""
        return self._fd

    def changed(self) -> bool:
        """True once per change of the config file since the last call; never blocks."""
        force = rearm = False
        writing: bool | None = None
        if self._fd is not None:
            force, writing, rearm = self._drain(self._fd)
        sig = _signature(self._path)
        if self._fd is not None and (rearm or not self._complete or sig != self._sig):
            # A dead watch, an earlier failure, or a different file (a symlink may now point
            # into another directory): compute the directories again and re-add them.
            self._arm()
        now = time.monotonic()
        if writing is not None:
            self._writing_since = (self._writing_since or now) if writing else None
        if self._writing_since is not None and now - self._writing_since < self._writer_grace:
            return False  # keep the old signature: the writer's CLOSE_WRITE will report it
        if force:
            self._sig, self._settling = sig, None
            return True
        # An event said the file is complete (a new symlink), or a watch died and events may be
        # lost: trust stat now. Seen by stat alone (polling, or a path inotify cannot see), the
        # file must have settled, so a truncate and the write that follows it are not caught in
        # between.
        if sig != self._sig and (writing is False or rearm or self._settled(sig, now)):
            self._sig, self._settling = sig, None
            return True
        return False

    def adopt(self) -> None:
        """The file as it is now is being read (a reload was asked for): not a change to report."""
        self._sig, self._settling = _signature(self._path), None

    def matches(self) -> bool:
        """Whether the file still looks as it did when `changed()` last reported it.

        The daemon reads the file after `changed()`; if it changed in between (a new file
        being written where a deleted one was), what it read may be incomplete: it should keep
        its config, and the next `changed()` reports the file once it is complete.
        """
        return _signature(self._path) == self._sig

    def _settled(self, sig: _Signature, now: float) -> bool:
        """True once `sig` has been seen unchanged for STAT_SETTLE (an empty file: the grace)."""
        if self._settling is None or self._settling[0] != sig:
            self._settling = (sig, now)
            return False
        empty = sig[0] == "file" and sig[3] == 0  # a truncation waiting for its write, most likely
        return now - self._settling[1] >= (self._writer_grace if empty else STAT_SETTLE)

    def close(self) -> None:
        """Release the inotify fd (and every watch with it). Safe to call twice."""
        if self._wm is not None:
            self._wm.close()
        self._wm = None
        self._fd = None
        self._dirs.clear()
        self._names.clear()

    # -- inotify ---------------------------------------------------------------------------

    def _start_inotify(self) -> str | None:
        """Set up inotify; return None, or the reason to poll instead."""
        try:
            pyinotify = _load_pyinotify()
        except Exception as exc:  # any import failure means "poll"
            return escape(f"pyinotify unavailable: {type(exc).__name__}: {exc}")
        ctypes.set_errno(0)
        try:
            self._wm = pyinotify.WatchManager()
        except Exception as exc:  # OSError (EMFILE, instance limit) or no inotify binding
            return escape(f"inotify_init failed: {_errno_text(exc)}")
        fd = int(self._wm.get_fd())
        # pyinotify calls inotify_init(), not inotify_init1(): the fd would leak into exec'd
        # programs and reads would block. Fix both here.
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        self._fd = fd
        primary = self._own_dir()
        error = self._arm().get(primary)
        if error is not None:
            self.close()
            return escape(f"cannot watch {primary}: {error}")
        return None

    def _own_dir(self) -> str:
        # realpath, unlike Path.resolve() before 3.13, does not raise on a symlink loop.
        return os.path.realpath(self._path.parent)

    def _targets(self) -> dict[str, set[bytes]]:
        """Directory -> names to watch: the path's own directory, and its target's if a symlink."""
        wanted: dict[str, set[bytes]] = {self._own_dir(): {os.fsencode(self._path.name)}}
        real = Path(os.path.realpath(self._path))
        wanted.setdefault(str(real.parent), set()).add(os.fsencode(real.name))
        return wanted

    def _arm(self) -> dict[str, str]:
        """(Re-)add a watch on every wanted directory; return the errors by directory.

        Adding a watch on an inode already watched returns the same wd, so this is also the
        liveness check: a different wd means the old watch is dead or the directory was replaced.
        """
        pyinotify = _load_pyinotify()
        errors: dict[str, str] = {}
        dirs: dict[str, int] = {}
        names: dict[int, set[bytes]] = {}
        for directory, wanted_names in self._targets().items():
            ctypes.set_errno(0)
            try:
                result = self._wm.add_watch(directory, _DIR_MASK, quiet=False)
            except (pyinotify.WatchManagerError, UnicodeEncodeError) as exc:
                # pyinotify encodes paths strictly, so a non-UTF-8 name cannot be watched.
                errors[directory] = _errno_text(exc)
                continue
            wd = int(result[os.path.normpath(directory)])
            dirs[directory] = wd
            names.setdefault(wd, set()).update(wanted_names)
        for wd in self._names.keys() - names.keys():
            self._unwatch(wd)
        self._dirs, self._names = dirs, names
        self._complete = not errors
        return errors

    def _unwatch(self, wd: int) -> None:
        pyinotify = _load_pyinotify()
        try:
            self._wm.rm_watch(wd, quiet=False)
        except pyinotify.WatchManagerError:
            self._wm.watches.pop(wd, None)  # the kernel had already dropped it

    def _drain(self, fd: int) -> tuple[bool, bool | None, bool]:
        """Read pending events without blocking: (changed, being written, directory watch dead).

        "Being written" is None when no event named the file, else whether its latest event
        says a writer still has it open.

        Raw reads rather than pyinotify's Notifier: its read_events() decodes names as strict
        UTF-8 and raises on any other file in the directory with a non-UTF-8 name (losing the
        rest of the batch), and its process_events() logs errors for a moved watched directory.
        We only need wd, mask and name, so a non-blocking os.read and struct.unpack suffice.
        """
        force = rearm = False
        last: dict[tuple[int, bytes], int] = {}  # (wd, watched name) -> mask of its latest event
        for _ in range(_MAX_READS):
            try:
                buf = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT_HEADER.size <= len(buf):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
                start = offset + _EVENT_HEADER.size
                name = buf[start : start + length].rstrip(b"\0")
                offset = start + length
                if mask & IN_Q_OVERFLOW:
                    force = rearm = True  # events were lost, maybe an IN_IGNORED among them
                elif wd in self._names:
                    if mask & _DIR_GONE:
                        rearm = True
                        if not mask & IN_IGNORED:
                            self._unwatch(wd)  # MOVE_SELF/UNMOUNT: stop following it
                    elif name in self._names[wd] and mask & _NAME_EVENTS:
                        last[wd, name] = mask
                        force = force or bool(mask & _CHANGED)
                if mask & IN_IGNORED:
                    self._wm.watches.pop(wd, None)  # keep pyinotify's table in step
            if len(buf) <= _READ_SIZE - _MAX_EVENT:
                break  # the next event would have fitted: the queue is empty (saves an EAGAIN)
        # The latest event for a name decides: a file just modified, or a regular file just
        # created, is still being written; report it on its CLOSE_WRITE, not on this wake-up.
        if not last:
            return force, None, rearm
        writing = any(
            mask & IN_MODIFY
            or (mask & IN_CREATE and _being_written(Path(self._dir_of(wd), os.fsdecode(name))))
            for (wd, name), mask in last.items()
        )
        return force, writing, rearm

    def _dir_of(self, wd: int) -> str:
        return next(d for d, w in self._dirs.items() if w == wd)
