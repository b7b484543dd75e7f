"""Owner resolution against real processes: the daemon's OwnerTracker and the one-shot full_scan.

The tracker is fed only the sockets each test opened (filtered from a real
sock_diag dump), so other processes on the host can open and close
listeners meanwhile without changing what is asserted; it still reads every
process on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from typing import Any

import pytest

from portwatch.model import Proto, Snapshot, Socket
from portwatch.proc import ProcFS
from portwatch.procfd import single_threaded
from portwatch.scan import OwnerTracker, SocketLister, Source, full_scan, own_netns
from portwatch.schedule import RECHECK_TICKS, THOROUGH_ROUNDS, RecheckTurns, Rotation
from portwatch.sockdiag import list_listeners
from tests.conftest import Holder, wait_exited

TCP4 = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}

# A process that takes commands on stdin and answers one JSON line each. It
# forks a partner at start (an "old" process with no sockets to speak of);
# `send` hands the listener to the partner over SCM_RIGHTS, which keeps it,
# and answers once the partner has it (until then it is only in flight).
HELPER = r"""
import json, os, signal, socket, sys
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
partner = os.fork()
if partner == 0:
    mine.close()
    theirs.send(b"ready")  # its fds settled: what the tracker reads first is what it keeps
    kept = []
    while True:
        _msg, fds, _flags, _addr = socket.recv_fds(theirs, 16, 4)
        kept.extend(fds)
        theirs.send(b"got")
mine.recv(16)
mine_only, limbo = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
listener = None
def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
def new_listener():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
    return s
say(pid=os.getpid(), partner=partner)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "listen":
        listener = new_listener()
        say(inode=os.fstat(listener.fileno()).st_ino)
    elif cmd == "send":
        socket.send_fds(mine, [b"x"], [listener.fileno()])
        mine.recv(16)
        say(sent=True)
    elif cmd == "close":
        listener.close()
        say(closed=True)
    elif cmd == "inflight":
        # Sent into a queue nobody reads, then closed: only the kernel holds it now.
        s = new_listener()
        inode = os.fstat(s.fileno()).st_ino
        socket.send_fds(mine_only, [b"x"], [s.fileno()])
        s.close()
        say(inode=inode)
    elif cmd == "exec":
        os.set_inheritable(listener.fileno(), True)
        say(exec=True)
        os.execv("/bin/sleep", ["sleep", "60"])
os.kill(partner, signal.SIGKILL)
"""


class Helper:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.pid: int = hello["pid"]
        self.partner: int = hello["partner"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "helper exited"
        return dict(json.loads(line))

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        for pid in (self.partner, self.pid):  # both ours; by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def helper() -> Iterator[Helper]:
    h = Helper()
    yield h
    h.stop()


class CountingProcFS(ProcFS):
    """The real /proc, counting what the tracker reads there (the tracker keeps no statistics).
    `counts_fds=False`: as on a kernel before 6.2, whose /proc/<pid>/fd does not say how many fds
    are open (None: whatever this kernel does)."""

    def __init__(self, counts_fds: bool | None = None) -> None:
        super().__init__(counts_fds=counts_fds)
        self.listings = self.reads = self.rechecked = self.counted = 0
        self.opened: list[int] = []  # whose fds were read (not through a kept directory fd)

    def reset(self) -> None:
        self.listings = self.reads = self.rechecked = self.counted = 0
        self.opened = []

    def fd_count(self, dfd: int) -> int | None:
        self.counted += 1
        return super().fd_count(dfd)

    def open_fd_dir(self, pid: int) -> int:
        self.opened.append(pid)
        return super().open_fd_dir(pid)

    def pids(self) -> list[int]:
        self.listings += 1
        return super().pids()

    def socket_fds_at(self, dfd: int, wanted: Container[int] | None = None) -> tuple[dict[int, int], int]:
        self.reads += 1
        return super().socket_fds_at(dfd, wanted)

    def stale_fds(self, pid: int, dfd: int, links: Mapping[bytes, int]) -> list[bytes]:
        self.rechecked += len(links)
        return super().stale_fds(pid, dfd, links)


# Each tracker test runs on this kernel as it is, and as if it gave no fd counts (older kernels).
FD_COUNTS = [pytest.param(None, id="kernel fd counts"), pytest.param(False, id="no fd counts")]


@pytest.fixture(params=FD_COUNTS)
def tracker(request: pytest.FixtureRequest) -> Iterator[OwnerTracker]:
    t = OwnerTracker(CountingProcFS(request.param), rotation_ticks=4)
    yield t
    t.close()


def fd_counts(tracker: OwnerTracker) -> bool:
    """The tracker's /proc says how many fds a process has open (it probed the kernel)."""
    return tracker.procfs.counts_fds


def counts(tracker: OwnerTracker) -> CountingProcFS:
    assert isinstance(tracker.procfs, CountingProcFS)
    return tracker.procfs


def sockets_of(inodes: set[int]) -> list[Socket]:
    return [s for s in list_listeners() if s.inode in inodes]


def update(tracker: OwnerTracker, inodes: set[int], *, early: bool = False, hint_pids: Iterable[int] = ()
           ) -> Snapshot:
    """One update over this test's sockets, what it read counted from a fresh start."""
    counts(tracker).reset()
    if early:
        return tracker.update_early(sockets_of(inodes), complete=True, hint_pids=hint_pids)
    return tracker.update(sockets_of(inodes), complete=True, hint_pids=hint_pids)


def pids_of(snap: Snapshot, inode: int) -> set[int]:
    return set(snap.listeners[inode].pids)


def wait_for_comm(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 5
    while (info := ProcFS().process(pid)) is None or info.comm != comm:
        assert time.monotonic() < deadline, f"{pid} never became {comm}"
        time.sleep(0.02)


def test_new_listener_new_holders_and_a_lost_worker(
    holders: Callable[..., Holder], tracker: OwnerTracker
) -> None:
    """A server started after the first update is found with its forked workers, without a
    search; a worker that exits is dropped at the next update, again without a search."""
    update(tracker, set())
    server = holders([TCP4, {**TCP4, "proto": "udp"}], fork=2)
    inodes = {s["inode"] for s in server.sockets}
    snap = update(tracker, inodes)
    everyone = {server.pid, *server.children}
    assert {i: pids_of(snap, i) for i in inodes} == dict.fromkeys(inodes, everyone)
    assert not tracker.searched  # new processes were read; nothing else had to be
    os.kill(server.children[0], signal.SIGKILL)  # a zombie now: its fds are gone
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        snap = update(tracker, inodes)
        if server.children[0] not in pids_of(snap, server.inode):
            break
        time.sleep(0.05)
    assert {i: pids_of(snap, i) for i in inodes} == {i: everyone - {server.children[0]} for i in inodes}
    assert snap.listeners[server.inode].processes[0].comm.startswith("python")
    assert not tracker.searched


# A server with three listeners and one worker holding them too; each SIGUSR1 makes the
# worker do its next step: close its copy of the last listener, then exit.
WORKER_STEPS = r"""
import json, os, signal, socket, sys
socks = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8); socks.append(s)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # kept pending for sigwait: none is lost
worker = os.fork()
if worker == 0:
    signal.sigwait({signal.SIGUSR1}); socks[2].close(); print("closed", flush=True)
    signal.sigwait({signal.SIGUSR1}); os._exit(0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
print(json.dumps({"pid": os.getpid(), "worker": worker,
                  "inodes": [os.fstat(s.fileno()).st_ino for s in socks]}), flush=True)
sys.stdin.read()
os.kill(worker, signal.SIGKILL)
"""


@pytest.mark.parametrize("early", [False, True])
def test_a_holder_closing_one_fd_or_exiting(early: bool) -> None:
    """A worker that closes its copy of one listener and keeps running is dropped from that
    listener's holders within RECHECK_TICKS regular updates (also with early updates, which skip
    the re-check, in between); when it exits, at the very next update, from every listener,
    though only one of its fds is re-read at that update. (The rotation, which would read the
    worker whole too, is kept out of the way: 600 updates.)"""
    tracker = OwnerTracker(CountingProcFS(), rotation_ticks=600)

    def update(tracker: OwnerTracker, inodes: set[int]) -> Snapshot:
        if early:
            tracker.update_early(sockets_of(inodes), complete=True, hint_pids=())
        return tracker.update(sockets_of(inodes), complete=True)

    proc = subprocess.Popen([sys.executable, "-c", WORKER_STEPS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        server, worker, inodes = info["pid"], info["worker"], set(info["inodes"])
        closed = info["inodes"][2]
        snap = update(tracker, inodes)
        assert {i: pids_of(snap, i) for i in inodes} == {i: {server, worker} for i in inodes}
        os.kill(worker, signal.SIGUSR1)  # started by us (a fork of our child)
        assert proc.stdout.readline() == "closed\n"
        updates = 0
        while worker in pids_of(snap, closed):
            assert updates < RECHECK_TICKS, "the closed fd was not noticed in time"
            snap = update(tracker, inodes)
            updates += 1
        assert {i: pids_of(snap, i) for i in inodes - {closed}} == {i: {server, worker} for i in inodes - {closed}}
        for _ in range(RECHECK_TICKS):  # whichever turn comes next
            assert pids_of(update(tracker, inodes), closed) == {server}
        while RecheckTurns.whole(worker, (tracker.turns.count + 1) % RECHECK_TICKS):
            update(tracker, inodes)  # so that the next update re-reads one fd of the worker only
        os.kill(worker, signal.SIGUSR1)  # it exits (a zombie until the server reaps it)
        assert wait_exited(worker)  # a zombie has closed all its fds
        snap = update(tracker, inodes)
        assert {i: pids_of(snap, i) for i in inodes} == {i: {server} for i in inodes}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        tracker.close()


def test_early_updates_read_only_the_hinted_processes(
    holders: Callable[..., Holder], tracker: OwnerTracker
) -> None:
    """An early update (processes are starting) finds a new server and its workers from the
    hinted pids alone, reading no other fd; what it skips (a worker that exited) the next
    regular update catches."""
    update(tracker, set())
    old = holders([TCP4], fork=1)
    update(tracker, {old.inode})
    update(tracker, {old.inode})
    # A regular update looks at every known holder: unchanged, one fstat each and no fd read
    # where the kernel counts fds; else a readlink of its fds.
    if fd_counts(tracker):
        assert counts(tracker).counted >= 2 and counts(tracker).rechecked == 0
    else:
        assert counts(tracker).rechecked >= 2
    server = holders([{**TCP4, "proto": "udp"}], fork=2)
    inodes = {old.inode, server.inode}
    snap = update(tracker, inodes, hint_pids=[server.pid, *server.children], early=True)
    assert pids_of(snap, server.inode) == {server.pid, *server.children}
    assert counts(tracker).rechecked == 0 and not tracker.searched
    assert counts(tracker).reads == 3
    worker = old.children[0]
    os.kill(worker, signal.SIGKILL)
    assert wait_exited(worker)  # its fds are closed then
    assert worker in pids_of(update(tracker, inodes, early=True), old.inode)
    assert pids_of(update(tracker, inodes), old.inode) == {old.pid}


def test_fd_count_is_the_number_of_open_fds_where_the_kernel_says_it() -> None:
    """The probe asks this kernel; where /proc/<pid>/fd's size counts fds, fd_count is that
    number, by path and through a directory fd, and None once the process is gone; elsewhere 0,
    and the tracker reads fds as it would without it."""
    procfs = ProcFS()
    counts = os.stat("/proc/self/fd").st_size > 0
    assert procfs.counts_fds is counts
    child = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        dfd = procfs.open_fd_dir(child.pid)
        try:
            assert procfs.fd_look(child.pid)[1] == procfs.fd_count(dfd) == (3 if counts else 0)
            assert ProcFS(counts_fds=False).fd_count(dfd) == 0
            child.kill()
            child.wait()
            assert procfs.fd_count(dfd) == (None if counts else 0)
        finally:
            os.close(dfd)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_peek_says_whether_a_young_process_holds_a_socket_it_did_not_hold(
    helper: Helper, holders: Callable[..., Holder], tracker: OwnerTracker
) -> None:
    """An early scan is worth its listing only when a young process holds a new socket: a
    listener it opened, or the listeners a forked worker shares with its parent."""
    assert tracker.peek([helper.pid])  # its socketpairs: never looked at before
    assert not tracker.peek([helper.pid])  # the same sockets as at the last look
    helper.ask("listen")
    assert tracker.peek([helper.pid])
    assert not tracker.peek([helper.pid])  # the same sockets as at the last look
    server = holders([TCP4], fork=1)
    young = [helper.pid, server.children[0]]
    assert tracker.peek(young)
    gone = holders([TCP4])
    os.kill(gone.pid, signal.SIGKILL)
    assert wait_exited(gone.pid)
    assert not tracker.peek([*young, gone.pid])  # an exited process has nothing to find
    helper.ask("exec")  # the same sockets in a new program (or a pid given to another process)
    assert not tracker.peek(young)
    assert tracker.peek(young, fresh=[helper.pid])  # its exec said: looked at anew


def test_proc_is_listed_only_when_a_pid_was_given_out(
    holders: Callable[..., Holder], tracker: OwnerTracker
) -> None:
    """A quiet tick skips the listing of /proc (/proc/loadavg's last pid is unchanged); a fork
    makes the next update list it, and the new holder is found at once."""
    update(tracker, set())
    for _ in range(50):  # the host may fork now and then; some update must find it quiet
        update(tracker, set())
        if not counts(tracker).listings:
            break
        time.sleep(0.02)
    else:
        pytest.fail("every update listed /proc: the host never stopped forking?")
    server = holders([TCP4], fork=1)
    snap = update(tracker, {server.inode})
    assert counts(tracker).listings
    assert pids_of(snap, server.inode) == {server.pid, *server.children}
    assert not tracker.searched  # found as new processes, not by a search


def test_handover_to_an_old_process(helper: Helper, tracker: OwnerTracker) -> None:
    """SCM_RIGHTS to a process that was there before: a copy is caught by the rotation
    within rotation_ticks updates; once the sender closes its own, at the next update."""
    update(tracker, set())
    inode = helper.ask("listen")["inode"]
    snap = update(tracker, {inode})
    assert pids_of(snap, inode) == {helper.pid}
    assert tracker.searched  # an old process opened it: it had to be searched for
    helper.ask("send")
    found_after = None
    for n in range(1, tracker.rotation.ticks + 1):
        snap = update(tracker, {inode})
        if helper.partner in pids_of(snap, inode):
            found_after = n
            break
    assert found_after is not None, "the rotation never reached the receiver"
    assert pids_of(snap, inode) == {helper.pid, helper.partner}
    helper.ask("close")
    snap = update(tracker, {inode})
    assert pids_of(snap, inode) == {helper.partner}


def test_a_search_reads_the_processes_whose_fd_count_changed_first(
    helper: Helper, tracker: OwnerTracker
) -> None:
    """A new listener in an old process: the processes with more or fewer fds open than when
    last read are searched before the others; the helper's idle partner is never reached."""
    update(tracker, set())
    update(tracker, set())
    inode = helper.ask("listen")["inode"]
    snap = update(tracker, {inode})
    assert pids_of(snap, inode) == {helper.pid} and tracker.searched
    assert helper.pid in counts(tracker).opened
    if fd_counts(tracker):  # else the uid decides, and the partner runs as the same user
        assert helper.partner not in counts(tracker).opened


@pytest.mark.parametrize("relist", [True, False], ids=["listed again", "not listed again"])
def test_a_listener_whose_process_exited_after_the_listing_costs_no_walk_of_the_host(
    helper: Helper, holders: Callable[..., Holder], tracker: OwnerTracker, relist: bool
) -> None:
    """A short-lived server that exits between the listing and the read of its fds: before the
    search reads the unlikely processes the tracker lists again, finds the socket gone and
    leaves it out. Without that, every process is read and the socket is said held by nobody."""
    update(tracker, set())
    update(tracker, set())
    server = holders([TCP4])
    listed = sockets_of({server.inode})
    os.kill(server.pid, signal.SIGKILL)
    assert wait_exited(server.pid)
    counts(tracker).reset()

    def still_listed() -> set[int]:
        return {s.inode for s in list_listeners()}

    tracker.rotation = Rotation(4)  # an empty one: what this update reads, the search read
    snap = tracker.update(listed, complete=True, still_listed=still_listed if relist else None)
    if relist:
        assert server.inode not in snap.listeners
        assert helper.partner not in counts(tracker).opened  # idle: not read
    else:
        assert snap.listeners[server.inode].unresolved is not None
        assert helper.partner in counts(tracker).opened


ADDS_PORTS = r"""
import os, socket, sys
held = []
for line in sys.stdin:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8); held.append(s)
    sys.stdout.write(f"{os.getpid()} {os.fstat(s.fileno()).st_ino}\n"); sys.stdout.flush()
"""


class EveryTurnWhole(RecheckTurns):
    @staticmethod
    def whole(pid: int, turn: int) -> bool:
        return True


@pytest.mark.parametrize("kernel_counts", FD_COUNTS)
def test_a_holder_that_adds_a_port_is_searched_among_the_changed(helper: Helper, kernel_counts: bool | None
                                                                 ) -> None:
    """A service already holding a listener (seen at the first update, so not a recent one)
    opens another: its fd count is one more than when last read, even though the re-check of
    the same update (whole, here at every update) saw the new count first, so the search reads
    it before any unchanged process."""
    tracker = OwnerTracker(CountingProcFS(kernel_counts), rotation_ticks=1000)
    tracker.turns = EveryTurnWhole()
    server = subprocess.Popen([sys.executable, "-c", ADDS_PORTS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        server.stdin.write("listen\n")
        server.stdin.flush()
        pid, first = map(int, server.stdout.readline().split())
        update(tracker, {first})  # the first update: everything is new, nothing recent
        server.stdin.write("listen\n")
        server.stdin.flush()
        second = int(server.stdout.readline().split()[1])
        snap = update(tracker, {first, second})
        assert pids_of(snap, second) == {pid} and tracker.searched
        if fd_counts(tracker):
            assert helper.partner not in counts(tracker).opened
    finally:
        tracker.close()
        server.stdin.close()
        server.wait(5)
        server.stdout.close()


def test_the_rotation_reads_an_unchanged_process_only_in_thorough_rounds(
    helper: Helper, tracker: OwnerTracker
) -> None:
    """An idle process that holds no listener costs one stat a round; its fds are read in one
    round of THOROUGH_ROUNDS (and whenever its fd count changes: test_handover_to_an_old_process)."""
    update(tracker, set())  # the first update reads every process
    rounds: dict[int, bool] = {}  # round -> the partner's fds were read in it (after the first update)
    for _ in range((THOROUGH_ROUNDS + 1) * tracker.rotation.ticks - 1):
        update(tracker, set())
        n = (tracker.rotation.steps - 1) // tracker.rotation.ticks
        rounds[n] = rounds.get(n, False) or helper.partner in counts(tracker).opened
    if fd_counts(tracker):
        assert rounds == {n: n == THOROUGH_ROUNDS - 1 for n in range(THOROUGH_ROUNDS + 1)}
    else:  # nothing says it is unchanged: read every round (the first may have been the update before)
        assert all(rounds[n] for n in range(1, THOROUGH_ROUNDS + 1))


def test_handover_with_the_sender_closing_is_seen_at_once(helper: Helper, tracker: OwnerTracker) -> None:
    update(tracker, set())
    inode = helper.ask("listen")["inode"]
    update(tracker, {inode})
    helper.ask("send")
    helper.ask("close")
    snap = update(tracker, {inode})
    assert pids_of(snap, inode) == {helper.partner}


def test_unresolvable_inode_is_remembered(helper: Helper, tracker: OwnerTracker) -> None:
    """A listener no process holds (in flight in a unix socket's queue) is searched for
    once; the next updates do not walk every process again."""
    update(tracker, set())
    inode = helper.ask("inflight")["inode"]
    snap = update(tracker, {inode})
    assert snap.listeners[inode].processes == ()
    assert snap.listeners[inode].unresolved is not None
    assert tracker.searched
    for _ in range(3):
        snap = update(tracker, {inode})
        assert not tracker.searched
        assert snap.listeners[inode].processes == ()


def test_exec_refreshes_details_when_hinted(helper: Helper, tracker: OwnerTracker) -> None:
    """A holder that execs keeps its listener; the exec hint (what the proc connector gives)
    makes the next update read its details again. Without a hint the rotation does it."""
    update(tracker, set())
    inode = helper.ask("listen")["inode"]
    before = update(tracker, {inode}).listeners[inode].processes[0]
    assert before.comm.startswith("python")
    helper.ask("exec")
    wait_for_comm(helper.pid, "sleep")
    # early=True (no rotation step): only what this test does may refresh the details.
    stale = update(tracker, {inode}, early=True).listeners[inode].processes[0]
    assert stale == before  # nothing told it; cached details stand until the rotation
    tracker.forget_processes([helper.pid])
    fresh = update(tracker, {inode}, hint_pids=[helper.pid], early=True).listeners[inode].processes[0]
    assert (fresh.pid, fresh.comm, fresh.exe) == (helper.pid, "sleep", os.path.realpath("/bin/sleep"))


def test_exec_without_hint_is_refreshed_by_the_rotation(helper: Helper, tracker: OwnerTracker) -> None:
    update(tracker, set())
    inode = helper.ask("listen")["inode"]
    update(tracker, {inode})
    helper.ask("exec")
    wait_for_comm(helper.pid, "sleep")
    comms = [update(tracker, {inode}).listeners[inode].processes[0].comm
             for _ in range(tracker.rotation.ticks + 1)]
    assert comms[-1] == "sleep"


def test_unchanged_update_returns_the_same_snapshot(
    holders: Callable[..., Holder], tracker: OwnerTracker
) -> None:
    """Nothing changed: the very same Snapshot (and Listener) objects, nothing rebuilt."""
    server = holders([TCP4], fork=1)
    first = update(tracker, {server.inode})
    again = update(tracker, {server.inode})
    assert again is first
    assert counts(tracker).counted >= 2  # its holders were looked at


def test_close_releases_directory_fds(holders: Callable[..., Holder]) -> None:
    server = holders([TCP4], fork=3)
    before = len(os.listdir("/proc/self/fd"))
    tracker = OwnerTracker(CountingProcFS())
    snap = update(tracker, {server.inode})
    assert len(pids_of(snap, server.inode)) == 4
    assert len(os.listdir("/proc/self/fd")) >= before + 4  # one kept per holder
    tracker.close()
    assert len(os.listdir("/proc/self/fd")) == before
    snap = update(tracker, {server.inode})  # still usable: re-opens what it needs
    assert len(pids_of(snap, server.inode)) == 4
    tracker.close()


def _stable(make: Callable[[], Snapshot], other: Callable[[], Snapshot], inodes: set[int]
            ) -> tuple[Snapshot, Snapshot]:
    """Two snapshots of the same moment, cut down to `inodes`: retried while the host churns."""
    for _ in range(6):
        a, b = (Snapshot({i: x for i, x in s.listeners.items() if i in inodes}, s.complete, s.denied_pids)
                for s in (make(), other()))
        if a == b:
            break
    return a, b


def test_every_path_gives_identical_snapshots(holders: Callable[..., Holder]) -> None:
    """Over the same live sockets, full_scan through netlink and through /proc/net, serial
    and split across processes, and the tracker, give equal snapshots (every socket, every
    holder, every detail), including IPv6, UDP and sockets shared with workers. Compared
    on this test's sockets: other tests may be opening and closing theirs meanwhile."""
    a_server = holders([TCP4, {"proto": "tcp", "family": 6, "address": "::1"},
                        {"proto": "udp", "family": 6, "address": "::", "v6only": 0},
                        {"proto": "tcp", "family": 6, "address": "::ffff:127.0.0.1", "v6only": 0}], fork=2)
    b_server = holders([{**TCP4, "proto": "udp"}])
    mine = {s["inode"] for s in a_server.sockets + b_server.sockets}
    procfs = ProcFS()
    netlink, proc = SocketLister(procfs, Source.NETLINK), SocketLister(procfs, Source.PROC)
    assert single_threaded()  # so the split walk below really forks

    def scan(lister: SocketLister, **kw: Any) -> Snapshot:
        snap, unread = full_scan(procfs, lister, **kw)
        assert unread == []
        return snap

    a, b = _stable(lambda: scan(netlink), lambda: scan(proc), mine)
    assert a == b
    assert set(a.listeners) == mine
    assert {len(x.processes) for x in a.listeners.values()} == {3, 1}
    a, b = _stable(lambda: scan(netlink, workers=1), lambda: scan(netlink, workers=3), mine)
    assert a == b

    tracker = OwnerTracker(procfs)
    try:
        def tracked() -> Snapshot:
            table = netlink.list((Proto.TCP, Proto.UDP), (4, 6))
            return tracker.update(table.sockets, complete=table.complete, host=own_netns(procfs))

        a, b = _stable(tracked, lambda: scan(netlink), mine)
        assert a == b
    finally:
        tracker.close()
