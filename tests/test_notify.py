"""portwatch.notify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import gc
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from portwatch.notify import Notifier, ascii_line, socket_address


class Receiver:
    """What systemd's notify socket sees: one datagram per sd_notify() call."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def datagram(self) -> bytes:
        data = self.sock.recv(65536)
        self.sock.setblocking(False)
        try:
            extra = self.sock.recv(65536)
        except BlockingIOError:
            extra = None
        finally:
            self.sock.settimeout(5)
        assert extra is None, f"a second datagram arrived: {extra!r}"
        return data

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[Receiver, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    receiver = Receiver(str(path))
    yield receiver, {"NOTIFY_SOCKET": str(path)}
    receiver.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[Receiver, dict[str, str]]]:
    name = f"portwatch-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name)
    yield receiver, {"NOTIFY_SOCKET": "@" + name}
    receiver.close()


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


# --- the messages ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_each_message_is_one_exact_datagram(kind: str, request: pytest.FixtureRequest) -> None:
    receiver, env = request.getfixturevalue(kind)
    with Notifier(env) as notifier:
        assert notifier.enabled
        assert notifier.ready() is True
        assert receiver.datagram() == b"READY=1"
        assert notifier.ready("watching 42 listeners, 0 conflicts") is True
        assert receiver.datagram() == b"READY=1\nSTATUS=watching 42 listeners, 0 conflicts"
        assert notifier.status("reloading config") is True
        assert receiver.datagram() == b"STATUS=reloading config"
        assert notifier.stopping() is True
        assert receiver.datagram() == b"STOPPING=1"
        assert notifier.last_error is None


def test_reloading_carries_monotonic_usec_in_the_same_datagram(
    path_socket: tuple[Receiver, dict[str, str]],
) -> None:
    receiver, env = path_socket
    with Notifier(env) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.datagram())
    assert match is not None
    assert before <= int(match[1]) <= after


def test_hostile_status_arrives_as_one_ascii_line(
    path_socket: tuple[Receiver, dict[str, str]],
) -> None:
    receiver, env = path_socket
    comm = "ng\x1b[31minx\nREADY=1\r\u202e✓ 日本\udcff\x00"
    with Notifier(env) as notifier:
        assert notifier.status(f"port 22 taken by {comm}") is True
    data = receiver.datagram()
    assert data.isascii()
    assert data.count(b"\n") == 0
    assert all(0x20 <= b < 0x7F for b in data)
    assert data == (
        b"STATUS=port 22 taken by ng\\x1b[31minx\\nREADY=1\\r"
        b"\\u202e\\u2713 \\u65e5\\u672c\\xff\\x00"
    )


def test_status_that_sdnotify_alone_would_drop_still_arrives(
    path_socket: tuple[Receiver, dict[str, str]],
) -> None:
    # sdnotify encodes latin-1 and silently drops the message otherwise.
    receiver, env = path_socket
    with Notifier(env) as notifier:
        assert notifier.ready("ok ✓ 😀") is True
    assert receiver.datagram() == b"READY=1\nSTATUS=ok \\u2713 \\U0001f600"


def test_long_status_is_capped_without_splitting_an_escape(
    path_socket: tuple[Receiver, dict[str, str]],
) -> None:
    receiver, env = path_socket
    with Notifier(env) as notifier:
        notifier.status("✓" * 100)
        notifier.status("a" * 1000)
    first = receiver.sock.recv(65536)
    second = receiver.sock.recv(65536)
    assert re.fullmatch(rb"STATUS=(\\u2713)+\.\.\.", first)
    assert len(first) <= len("STATUS=") + 200
    assert second == b"STATUS=" + b"a" * 197 + b"..."


def test_ascii_line() -> None:
    assert ascii_line("") == ""
    assert ascii_line("plain") == "plain"
    assert ascii_line("a\\b") == "a\\\\b"  # the backslash itself is escaped: no forged \n
    assert ascii_line("x" * 200) == "x" * 200
    assert ascii_line("x" * 201) == "x" * 197 + "..."
    assert ascii_line("é", limit=10) == "\\u00e9"


# --- the watchdog ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "٣٠"}, None),  # Arabic-Indic digits: isdigit() but not systemd's
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


def test_watchdog_pings_only_when_asked(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    with Notifier({**env, "WATCHDOG_USEC": "2000000"}) as notifier:
        assert notifier.watchdog_interval == 1.0
        assert notifier.watchdog() is True
        assert receiver.datagram() == b"WATCHDOG=1"
    other = {**env, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    for not_ours in (env, other):
        with Notifier(not_ours) as notifier:
            assert notifier.watchdog() is False
    assert receiver.empty()


# --- outside systemd -------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path.sock"])
def test_without_a_usable_notify_socket_nothing_happens(value: str | None) -> None:
    env = {"WATCHDOG_USEC": "30000000"}
    if value is not None:
        env["NOTIFY_SOCKET"] = value
    gc.collect()
    fds = _fd_count()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked socket would be a ResourceWarning
        notifier = Notifier(env)
        assert _fd_count() == fds  # no socket at all
        assert notifier.enabled is False
        assert notifier.ready("x") is False
        assert notifier.reloading() is False
        assert notifier.status("x") is False
        assert notifier.stopping() is False
        assert notifier.watchdog() is False
        assert _fd_count() == fds
        notifier.close()
        del notifier
        gc.collect()


def test_default_env_is_os_environ(
    path_socket: tuple[Receiver, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, env = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    with Notifier() as notifier:
        assert notifier.ready() is True
    assert receiver.datagram() == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert Notifier().enabled is False


def test_socket_address() -> None:
    assert socket_address("@name") == "\0name"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("vsock:2:1") is None


# --- failures never reach the daemon -----------------------------------------------------


def test_missing_socket_returns_false_and_keeps_the_error(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) as notifier:
        assert notifier.enabled  # systemd said where; the socket is just not there
        assert notifier.ready() is False
        assert isinstance(notifier.last_error, FileNotFoundError)
        assert notifier.status("again") is False


def test_socket_that_went_away_and_came_back(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = Receiver(str(path))
    fds = _fd_count()
    with Notifier({"NOTIFY_SOCKET": str(path)}) as notifier:
        assert notifier.status("one") is True
        assert receiver.datagram() == b"STATUS=one"
        receiver.close()
        path.unlink()
        assert notifier.status("lost") is False
        assert isinstance(notifier.last_error, OSError)
        # systemd binds its socket again (daemon-reexec): the next message reaches it.
        receiver = Receiver(str(path))
        assert notifier.status("two") is True
        assert notifier.last_error is None
        assert receiver.datagram() == b"STATUS=two"
    receiver.close()
    assert _fd_count() == fds - 1  # the receiver's, closed above; ours is closed too


def test_stale_connection_is_replaced_at_once(tmp_path: Path) -> None:
    # The socket is bound anew between two messages: no message may be lost for that.
    path = tmp_path / "notify.sock"
    first = Receiver(str(path))
    with Notifier({"NOTIFY_SOCKET": str(path)}) as notifier:
        assert notifier.ready() is True
        assert first.datagram() == b"READY=1"
        first.close()
        path.unlink()
        second = Receiver(str(path))
        try:
            assert notifier.stopping() is True
            assert second.datagram() == b"STOPPING=1"
        finally:
            second.close()


def test_close_is_final_and_idempotent(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    fds = _fd_count()
    notifier = Notifier(env)
    assert notifier.ready() is True
    assert _fd_count() == fds + 1
    notifier.close()
    notifier.close()
    assert _fd_count() == fds
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert receiver.datagram() == b"READY=1"
    assert receiver.empty()


def test_non_ascii_message_is_a_bug_not_a_silent_drop(
    path_socket: tuple[Receiver, dict[str, str]],
) -> None:
    _receiver, env = path_socket
    with Notifier(env) as notifier, pytest.raises(ValueError, match="ASCII"):
        notifier._send("STATUS=✓")

