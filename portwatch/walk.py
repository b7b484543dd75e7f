"""The one-shot views' walk of every process's fds, shared with forked helpers.

`portwatch list` must name every holder of every listening socket, which
costs one readlink per open fd on the host: on a busy host, most of its run.
The kernel does most of that work, so the walk scales with CPUs;
threads would not (every readlink hands the GIL over). This process and
forked helpers take pids one at a time from a pipe filled beforehand, so a
process with thousands of fds does not leave one of them waiting for the
other, and the helpers send back what they found with marshal.

A `Walk` forks its helpers as soon as it is made, before anyone knows which
sockets are wanted: the `portwatch` command makes one before its own
start-up (imports, argument parsing, the socket dump: a quarter of a run),
and the helpers walk meanwhile, noting every socket they see; `finish`
then tells them which ones are wanted. Like `ss -p` and psutil, this walks the
processes before the sockets are listed, so a process already walked that
opens a socket in between (some 30 ms) is not named as its owner, and one
that closes its copy in between still is.

Imports nothing heavy, for the same reason as portwatch.procfd.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import struct
from itertools import chain

from portwatch.procfd import (
    AccessDenied,
    ProcessFiles,
    ProcessGone,
    list_pids,
    process_files,
    read_all,
    single_threaded,
    socket_fds,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from portwatch.model import Process
    from portwatch.proc import ProcFS

# Below this many processes a helper costs more (fork, page faults) than it saves.
MIN_PIDS_PER_HELPER = 200
MAX_HELPERS = 3
_PID = struct.Struct("=i")


class WalkResult:
    """Who holds which of the wanted inodes, and which processes could not be read."""

    __slots__ = ("denied", "holders", "processes")

    def __init__(self) -> None:
        self.holders: dict[int, set[int]] = {}  # inode -> pids
        self.denied: set[int] = set()
        self.processes: dict[int, Process] = {}  # the holders' details


def walk_holders(root: str, inodes: set[int] | None, pids: Iterable[int]) -> WalkResult:
    """Read the fds of `pids` and record which of them hold one of `inodes` (any socket if None)."""
    result = WalkResult()
    holders = result.holders
    for pid in pids:
        try:
            fds, _ = socket_fds(root, pid, inodes)
        except ProcessGone:
            continue
        except AccessDenied:
            result.denied.add(pid)
            continue
        for inode in fds.values():
            holders.setdefault(inode, set()).add(pid)
    return result


class Walk:
    """A walk of every process under `root`, begun by helpers as soon as it is made.

    `workers`: how many processes share it, this one included (default: one
    per CPU, at most 4, and one per 200 processes on the host). `pids`: walk
    these instead of every process (and none started later). fork() is
    only used while this process is single-threaded; if a helper fails, its
    share is walked again here. Call `finish` for the result, or `abandon`.
    """

    def __init__(self, root: str, *, workers: int | None = None, pids: list[int] | None = None) -> None:
        self.root = root
        self._every = pids is None
        self._pids = list_pids(root) if pids is None else pids
        self._queue: int | None = None
        self._helpers: list[_Helper] = []
        if workers is None:
            cpus = len(os.sched_getaffinity(0))
            workers = min(cpus, MAX_HELPERS + 1, len(self._pids) // MIN_PIDS_PER_HELPER or 1)
        workers = min(workers, len(self._pids))
        if workers > 1 and single_threaded():
            self._queue = _pid_queue(self._pids)
        if self._queue is not None:
            for _ in range(workers - 1):
                try:
                    self._helpers.append(self._fork_helper(self._queue))
                except OSError:
                    break  # no fork (EAGAIN, ENOMEM): fewer hands

    def finish(self, procfs: ProcFS, inodes: set[int]) -> WalkResult:
        """Who holds which of `inodes`, and the details of every holder.

        The helpers are told which inodes are wanted; this process walks what
        they have not taken yet and the processes started since the walk was
        made (a worker forked with a listener), then merges their answers.
        """
        started = set(list_pids(self.root)).difference(self._pids) if self._every else set()
        started.difference_update(h.pid for h in _LIVE)  # helpers hold copies of our fds
        try:
            wanted = marshal.dumps(list(inodes))
            for helper in self._helpers:
                helper.tell(wanted)
            queue, self._queue = self._queue, None
            if queue is None:
                result = walk_holders(self.root, inodes, [*self._pids, *started])
            else:
                try:
                    result = walk_holders(self.root, inodes, chain(_take(queue), started))
                finally:
                    os.close(queue)
            result.processes = _details(procfs, _pids_in(result.holders))  # while the helpers read theirs
            answers = [helper.answer() for helper in self._helpers]
            self._helpers = []
        except BaseException:
            self.abandon()  # none of them outlives an error here (an interrupt, an fd limit)
            raise
        received = [answer for answer in answers if answer is not None]
        if len(received) < len(answers):  # which pids a failed helper took is unknown: walk them all here
            result = walk_holders(self.root, inodes, [*self._pids, *started])
            result.processes = _details(procfs, _pids_in(result.holders))
            return result
        for holders, denied, files in received:
            for inode, pids in holders.items():
                result.holders.setdefault(inode, set()).update(pids)
            result.denied.update(denied)
            for pid, read in files.items():
                result.processes[pid] = procfs.process_from(pid, read)
        return result

    def abandon(self) -> None:
        """Stop the helpers (when the command turns out not to want the walk) and reap them."""
        if self._queue is not None:
            os.close(self._queue)
            self._queue = None
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.stop()

    def _fork_helper(self, queue: int) -> _Helper:
        wanted_r, wanted_w = os.pipe2(os.O_CLOEXEC)
        opened = [wanted_r, wanted_w]
        try:
            answers_r, answers_w = os.pipe2(os.O_CLOEXEC)
            opened += (answers_r, answers_w)
            pid = os.fork()
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        if pid == 0:  # the helper: walk, send, and leave without running any of the parent's cleanup
            code = 1
            try:
                os.close(wanted_w)
                os.close(answers_r)
                for other in _LIVE:  # so that their pipes see end-of-file when they should
                    other.wanted = _close(other.wanted)
                    other.answers = _close(other.answers)
                found = walk_holders(self.root, None, _take(queue))
                # Our own parent wrote it, through a pipe nobody else holds.
                inodes = set(marshal.loads(read_all(wanted_r)))  # noqa: S302
                holders = {i: list(pids) for i, pids in found.holders.items() if i in inodes}
                files = {}
                for pid in _pids_in(holders):
                    read = process_files(self.root, pid)
                    if read is not None:
                        files[pid] = read
                _write_all(answers_w, marshal.dumps((holders, list(found.denied), files)))
                code = 0
            finally:
                os._exit(code)
        os.close(wanted_r)
        os.close(answers_w)
        return _Helper(pid, wanted_w, answers_r)


# Every helper not yet reaped, of any Walk: a helper forked later closes this process's ends of
# their pipes (or one Walk's helper would keep another's open, and it would never see
# end-of-file), and none of them is taken for a process that started during a walk.
_LIVE: set[_Helper] = set()


class _Helper:
    """A forked helper: its pid, where to tell it the wanted inodes, where it answers."""

    __slots__ = ("answers", "pid", "wanted")

    def __init__(self, pid: int, wanted: int, answers: int) -> None:
        self.pid = pid  # -1 once reaped
        self.wanted = wanted  # -1 once closed, as answers
        self.answers = answers
        _LIVE.add(self)

    def tell(self, wanted: bytes) -> None:
        """Send the wanted inodes and end-of-file.

        Blocks only if the pipe is smaller than `wanted`, until the helper has
        walked what it can: slower then, never stuck.
        """
        try:  # noqa: SIM105 (contextlib is kept off the early start's imports)
            _write_all(self.wanted, wanted)
        except OSError:
            pass  # it failed: its answer will say so
        self.wanted = _close(self.wanted)

    def answer(self) -> tuple[dict[int, list[int]], list[int], dict[int, ProcessFiles]] | None:
        """Its ({inode: pids}, denied pids, {holder pid: its files}), or None when it failed.

        Should reading fail (an interrupt), the helper is left to `stop`.
        """
        data = read_all(self.answers)
        self.answers = _close(self.answers)
        _, status = os.waitpid(self.pid, 0)
        self.pid = -1
        _LIVE.discard(self)
        if status != 0:
            return None
        # Our own helper wrote it, through a pipe nobody else holds.
        holders, denied, files = marshal.loads(data)  # noqa: S302
        return holders, denied, files

    def stop(self) -> None:
        """Kill it (ours, by pid) and reap it, and close our ends of its pipes."""
        if self.pid > 0:
            os.kill(self.pid, 9)  # SIGKILL, without importing signal (an enum module) for it
            os.waitpid(self.pid, 0)
            self.pid = -1
        _LIVE.discard(self)
        self.wanted = _close(self.wanted)
        self.answers = _close(self.answers)


def _close(fd: int) -> int:
    if fd >= 0:
        os.close(fd)
    return -1


def _pids_in(holders: Mapping[int, Iterable[int]]) -> set[int]:
    return set().union(*holders.values())


def _details(procfs: ProcFS, pids: Iterable[int]) -> dict[int, Process]:
    found = {}
    for pid in pids:
        info = procfs.process(pid)
        if info is not None:
            found[pid] = info
    return found


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pid_queue(pids: list[int]) -> int | None:
    """The read end of a pipe holding every pid (closed for writing), or None if they do not fit."""
    data = b"".join(_PID.pack(pid) for pid in pids)
    rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if len(data) > 65536:
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, len(data))
        if os.write(wfd, data) == len(data):
            return rfd
    except OSError:
        pass
    finally:
        os.close(wfd)
    os.close(rfd)
    return None


def _take(queue: int) -> Iterator[int]:
    """Pids from the queue until it is empty; a read of one pid is atomic, so no pid is taken twice."""
    read, size, unpack = os.read, _PID.size, _PID.unpack
    while chunk := read(queue, size):
        yield unpack(chunk)[0]
