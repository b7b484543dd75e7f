"""The list / who / ps views against real sockets held by real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    AS_NOBODY,
    ROOT,
    Holder,
    free_port,
    masked_net_tables,
    python_for_nobody,
    run_cli,
)

HOSTILE_NAME = b"ev\x1b[31mil\n$(id)"  # 14 bytes: fits comm's 15


def _by_inode(listing: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {entry["inode"]: entry for entry in listing}


def _list_json(*extra: str) -> list[dict[str, Any]]:
    # --all: the test servers' UDP ports are the kernel's pick, from the ephemeral range.
    result = run_cli("list", "--all", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_list_every_family_and_protocol(holders: Callable[..., Holder]) -> None:
    """TCP and UDP listeners on IPv4 and IPv6 appear with the inode fstat() reports and their pid."""
    h = holders(
        [
            {"proto": "tcp", "family": 4, "address": "127.0.0.1"},
            {"proto": "tcp", "family": 6, "address": "::1"},
            {"proto": "udp", "family": 4, "address": "127.0.0.1"},
            {"proto": "udp", "family": 6, "address": "::1"},
            {"proto": "tcp", "family": 6, "address": "::ffff:127.0.0.1", "v6only": 0},
        ]
    )
    listing = _by_inode(_list_json())
    expected = [("tcp", "127.0.0.1"), ("tcp", "::1"), ("udp", "127.0.0.1"), ("udp", "::1"),
                ("tcp", "::ffff:127.0.0.1")]
    for sock, (proto, address) in zip(h.sockets, expected, strict=True):
        entry = listing[sock["inode"]]
        assert (entry["proto"], entry["address"], entry["port"]) == (proto, address, sock["port"])
        assert entry["uid"] == os.getuid()
        assert [p["pid"] for p in entry["processes"]] == [h.pid]
        proc = entry["processes"][0]
        assert proc["exe"] == os.path.realpath(sys.executable)
        assert proc["cmdline"][1].endswith("listener.py")
        assert proc["user"] == "root" if os.getuid() == 0 else proc["user"]
        assert set(proc) >= {"pid", "comm", "exe", "cmdline", "user", "unit"}


def test_list_filters(holders: Callable[..., Holder]) -> None:
    """--tcp/--udp and -4/-6 select what is listed."""
    h = holders(
        [
            {"proto": "tcp", "family": 4, "address": "127.0.0.1"},
            {"proto": "udp", "family": 6, "address": "::1"},
        ]
    )
    tcp4, udp6 = (s["inode"] for s in h.sockets)
    assert tcp4 in _by_inode(_list_json("--tcp", "-4"))
    assert udp6 not in _by_inode(_list_json("--tcp"))
    assert udp6 in _by_inode(_list_json("--udp", "-6"))
    assert tcp4 not in _by_inode(_list_json("-6"))


def test_shared_socket_lists_every_owner(holders: Callable[..., Holder]) -> None:
    """A socket shared by a master and forked workers names all of them (netstat names one)."""
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}], fork=3)
    entry = _by_inode(_list_json())[h.inode]
    assert sorted(p["pid"] for p in entry["processes"]) == sorted([h.pid, *h.children])
    table = run_cli("list").stdout
    rows = [line for line in table.splitlines() if f"127.0.0.1:{h.port}" in line]
    assert len(rows) == 4


def test_hostile_name_is_escaped_in_tables_and_exact_in_json(holders: Callable[..., Holder]) -> None:
    """A name with an escape, a newline and shell syntax neither splits a row nor reaches the terminal raw."""
    h = holders(
        [{"proto": "tcp", "family": 4, "address": "127.0.0.1"}],
        name=HOSTILE_NAME,
        argv_extra=[b"arg\nwith\x1b]0;title\x07", b"\xff\xfe"],
    )
    entry = _by_inode(_list_json())[h.inode]
    proc = entry["processes"][0]
    assert proc["comm"] == HOSTILE_NAME.decode()
    assert proc["cmdline"][-2:] == ["arg\nwith\x1b]0;title\x07", "\udcff\udcfe"]
    for view in (("list",), ("who", str(h.port)), ("ps",)):
        out = run_cli(*view).stdout
        assert "\x1b" not in out and "\x07" not in out
        rows = [line for line in out.splitlines() if str(h.pid) in line.split()]
        assert len(rows) == 1, out
        assert "ev\\x1b[31mil\\n$(id)" in rows[0]
        assert "\\xff\\xfe" in rows[0]


def test_who_exit_codes(holders: Callable[..., Holder]) -> None:
    """who: 0 with the holders when something listens, 1 when nothing does, --udp selects UDP."""
    h = holders(
        [{"proto": "tcp", "family": 4, "address": "127.0.0.1"},
         {"proto": "udp", "family": 4, "address": "127.0.0.1"}], fork=1,
    )
    tcp_port, udp_port = (s["port"] for s in h.sockets)
    found = run_cli("who", str(tcp_port), "--json")
    assert found.returncode == 0
    (entry,) = json.loads(found.stdout)
    assert sorted(p["pid"] for p in entry["processes"]) == sorted([h.pid, *h.children])
    text = run_cli("who", str(tcp_port))
    assert text.returncode == 0 and str(h.pid) in text.stdout
    assert run_cli("who", str(udp_port), "--udp").returncode == 0
    with_socket_closed = free_port()
    nothing = run_cli("who", str(with_socket_closed))
    assert (nothing.returncode, nothing.stdout) == (1, "")
    assert nothing.stderr == f"portwatch: nothing listens on tcp port {with_socket_closed}\n"
    nothing_json = run_cli("who", str(with_socket_closed), "--json")
    assert (nothing_json.returncode, json.loads(nothing_json.stdout)) == (1, [])


@pytest.mark.root
@pytest.mark.parametrize("fault", ["missing", "unreadable"])
def test_a_table_that_cannot_be_read_is_never_taken_for_empty(
    tmp_path: Path, holders: Callable[..., Holder], fault: str,
) -> None:
    """/proc/net/tcp missing or unreadable (masked, as a container runtime or a security module
    would): every view prints what it could read, names the table on stderr and exits 65; `who`
    never says "nothing listens" about it, and is not troubled by a table it does not need."""
    tcp = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}])
    udp = holders([{"proto": "udp", "family": 4, "address": "127.0.0.1"}])
    prefix = masked_net_tables(tmp_path / "net", **{fault: ["tcp"]})

    def run(*args: str) -> tuple[int, str, list[str]]:
        result = run_cli(*args, "--source", "proc", prefix=prefix)
        assert "Traceback" not in result.stderr
        return result.returncode, result.stdout, [x for x in result.stderr.splitlines() if "cannot read" in x]

    status, out, unread = run("list", "--all", "--json")
    inodes = {entry["inode"] for entry in json.loads(out)}
    assert status == 65 and udp.inode in inodes and tcp.inode not in inodes
    (line,) = unread
    assert "/proc/self/net/tcp:" in line and "tcp6" not in line
    status, out, unread = run("list", "--all")
    assert status == 65 and f":{udp.port} " in out and len(unread) == 1
    status, out, unread = run("who", str(tcp.port))
    assert status == 65 and out == "" and len(unread) == 1
    status, out, unread = run("who", "--json", str(tcp.port))
    assert (status, json.loads(out), len(unread)) == (65, [], 1)
    status, out, unread = run("who", "--udp", str(udp.port))
    assert status == 0 and str(udp.pid) in out and unread == []
    status, out, unread = run("who", "--udp", str(free_port()))
    assert (status, unread) == (1, [])
    status, out, unread = run("ps")
    assert status == 65 and len(unread) == 1


@pytest.mark.parametrize("bad", ["abc", "0", "70000", "-1", "22x", ""])
def test_who_usage_errors(bad: str) -> None:
    """A bad port is a one-line message and exit status 2, never a traceback."""
    result = run_cli("who", bad)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "invalid port" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_proc_root_is_one_line() -> None:
    result = run_cli("--proc", "/nonexistent-proc", "list")
    assert result.returncode == 65
    assert result.stderr == "portwatch: cannot read /nonexistent-proc: No such file or directory\n"


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["check", "--config", "etc/portwatch.yaml"]])
def test_a_full_disk_is_one_line(args: list[str]) -> None:
    """The output cannot be written (/dev/full: ENOSPC): one line on stderr, exit 74."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "portwatch", *args], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 74
    assert result.stderr.splitlines()[-1] == "portwatch: cannot write the output: No space left on device"
    assert "Traceback" not in result.stderr


def test_usage_errors_are_one_line() -> None:
    """Unknown commands and options give one line and exit 2."""
    for args in (("frobnicate",), ("list", "--tcp", "--udp"), ("list", "--bogus"), ()):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_ps_lists_processes_with_ports(holders: Callable[..., Holder]) -> None:
    """ps shows every process; ours carries its listening ports."""
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"},
                 {"proto": "udp", "family": 6, "address": "::1"}])
    result = run_cli("ps", "--json")
    assert result.returncode == 0
    by_pid = {p["pid"]: p for p in json.loads(result.stdout)}
    assert os.getpid() in by_pid
    mine = by_pid[h.pid]
    assert {(p["proto"], p["port"]) for p in mine["ports"]} == {
        ("tcp", h.sockets[0]["port"]), ("udp", h.sockets[1]["port"])}
    assert set(mine) >= {"pid", "comm", "exe", "cmdline", "user", "ports"}


def test_broken_pipe_is_quiet(holders: Callable[..., Holder]) -> None:
    """`portwatch ps | head -1` ends without a traceback."""
    pipeline = subprocess.run(  # noqa: S602 - a fixed pipeline, no outside input
        f"{sys.executable} -m portwatch ps | head -1",
        shell=True,
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert "Traceback" not in pipeline.stderr
    assert pipeline.stdout.startswith("PID")


def _ss_listeners() -> dict[int, set[int]]:
    """inode -> pids, from `ss -ltnupHe` (the oracle)."""
    out = subprocess.run(["ss", "-ltnupHe"], capture_output=True, text=True, check=True).stdout
    found: dict[int, set[int]] = {}
    for line in out.splitlines():
        inode = re.search(r"\bino:(\d+)", line)
        if inode:
            found[int(inode.group(1))] = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    return found


def test_agrees_with_ss(holders: Callable[..., Holder]) -> None:
    """Every listener ss sees, portwatch sees, with the same holders."""
    holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"},
             {"proto": "udp", "family": 6, "address": "::1"}], fork=2)
    for _ in range(3):  # other processes on the host may open or close sockets meanwhile
        before = _ss_listeners()
        ours = {e["inode"]: {p["pid"] for p in e["processes"]} for e in _list_json()}
        if before == _ss_listeners():
            break
    else:
        pytest.fail("the host's sockets kept changing; no stable comparison")
    assert before == ours


@pytest.mark.root
def test_unprivileged_user_sees_every_socket(holders: Callable[..., Holder], readable_tree: Path) -> None:
    """As `nobody` the CLI lists root's sockets (owner unresolved, with the reason), resolves its own, and says why once."""
    drop, python = list(AS_NOBODY), python_for_nobody()
    roots = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}])
    mine = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}], prefix=drop, python=python,
                   program=readable_tree / "programs" / "listener.py")
    env = {"PYTHONPATH": str(readable_tree), "PATH": os.environ["PATH"]}
    result = subprocess.run(
        [*drop, python, "-m", "portwatch", "list", "--json"],
        capture_output=True, text=True, env=env, cwd="/", check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listing = _by_inode(json.loads(result.stdout))
    assert listing[roots.inode]["processes"] == []
    assert listing[roots.inode]["unresolved"] == "permission_denied"
    assert listing[roots.inode]["uid"] == 0
    assert [p["pid"] for p in listing[mine.inode]["processes"]] == [mine.pid]
    hints = [line for line in result.stderr.splitlines() if "CAP_SYS_PTRACE" in line]
    assert len(hints) == 1 and "CAP_DAC_READ_SEARCH" in hints[0] and "root" in hints[0]
    table = subprocess.run(
        [*drop, python, "-m", "portwatch", "list"],
        capture_output=True, text=True, env=env, cwd="/", check=False, timeout=60,
    )
    row = next(line for line in table.stdout.splitlines() if f":{roots.port}" in line)
    assert "(permission_denied)" in row


@pytest.mark.root
def test_root_without_the_capabilities_is_not_told_to_run_as_root(
    holders: Callable[..., Holder], readable_tree: Path,
) -> None:
    """Root in a sandbox that took CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH away cannot read
    another user's fds: the hint names the capabilities root lacks, not "run as root"."""
    nobodys = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}], prefix=AS_NOBODY,
                      python=python_for_nobody(), program=readable_tree / "programs" / "listener.py")
    result = run_cli("who", str(nobodys.port),
                     prefix=["setpriv", "--bounding-set=-sys_ptrace,-dac_read_search,-dac_override"])
    assert result.returncode == 0 and "(permission_denied)" in result.stdout
    (hint,) = [line for line in result.stderr.splitlines() if "could not be identified" in line]
    assert "root runs without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH" in hint
    assert "run as root" not in hint


@pytest.mark.root
def test_ipv6_address_in_a_network_namespace(tmp_path: Path) -> None:
    """Inside a fresh network namespace, non-trivial IPv6 addresses print in RFC 5952 form."""
    script = tmp_path / "inside.sh"
    script.write_text(
        "set -e\n"
        "ip link set lo up\n"
        "ip addr add 2001:db8:0:0:1:0:0:5/128 dev lo nodad\n"
        "ip addr add fd00:0:0:0:0:0:0:abcd/128 dev lo nodad\n"
        f"{sys.executable} -c 'import socket,time,sys\n"
        "a=socket.socket(socket.AF_INET6); a.bind((\"2001:db8::1:0:0:5\",8443)); a.listen()\n"
        "b=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); b.bind((\"fd00::abcd\",5353))\n"
        f"sys.stdout.flush(); import subprocess; r=subprocess.run([sys.executable,\"-m\",\"portwatch\",\"list\",\"--json\"],capture_output=True,text=True,cwd=\"{ROOT}\"); print(r.stdout)'\n"
    )
    result = subprocess.run(["unshare", "--net", "sh", str(script)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    got = {(e["proto"], e["address"], e["port"]) for e in listing}
    assert got == {("tcp", "2001:db8::1:0:0:5", 8443), ("udp", "fd00::abcd", 5353)}
    assert all(e["processes"] for e in listing)


def test_sources_agree(holders: Callable[..., Holder]) -> None:
    """--source netlink and --source proc list the same sockets."""
    holders([{"proto": "tcp", "family": 6, "address": "::", "v6only": 0},
             {"proto": "udp", "family": 4, "address": "127.0.0.1"}])
    for _ in range(3):
        a = run_cli("list", "--json", "--source", "netlink").stdout
        b = run_cli("list", "--json", "--source", "proc").stdout
        if a == b:
            break
    assert json.loads(a) == json.loads(b)
