"""Every network namespace: naming (pure, from captured cgroup lines and engine state), the
views and the daemon over real namespaces (`ip netns`, `unshare --net`) and real listeners."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portwatch.config import ConfigError, parse_config
from portwatch.events import change_event, describe
from portwatch.model import Container, Listener, NetNs, Process, Proto, Snapshot, Socket
from portwatch.namespaces import Namespaces
from portwatch.netns import (
    container_from_cgroup,
    docker_name,
    forwards_to,
    make_netns,
    podman_names,
    selects,
)
from portwatch.policy import Allow, PortRange, Rule, evaluate
from portwatch.proc import ProcFS
from portwatch.scan import SocketLister, own_netns
from portwatch.snapshot import Change, ChangeKind
from portwatch.state import StateStore
from tests.conftest import DaemonProcess, Holder, free_port, run_cli
from tests.systemd_sandbox import make_cgroups, remove_cgroups

ID = "3f4e1b0c9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"

# -- naming (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # docker, systemd cgroup driver, v2 and v1
        (f"0::/system.slice/docker-{ID}.scope\n", Container("docker", ID)),
        (f"12:pids:/system.slice/docker-{ID}.scope\n1:name=systemd:/system.slice/docker-{ID}.scope\n",
         Container("docker", ID)),
        # docker, cgroupfs driver
        (f"4:memory:/docker/{ID}\n0::/\n", Container("docker", ID)),
        # podman (systemd driver, with a process in a sub-cgroup) and its cgroupfs layout
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", Container("podman", ID)),
        (f"3:cpu:/libpod_parent/libpod-{ID}\n", Container("podman", ID)),
        # containerd and CRI-O under Kubernetes
        (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-{ID}.scope\n",
         Container("containerd", ID)),
        (f"0::/kubepods.slice/kubepods-pod2.slice/crio-{ID}.scope\n", Container("crio", ID)),
        # systemd-nspawn: the machine's name, unescaped
        ("0::/machine.slice/machine-web\\x2d1.scope/payload\n", Container("nspawn", "web-1")),
        # lxc, both layouts
        ("0::/lxc.payload.db/init.scope\n", Container("lxc", "db")),
        ("5:memory:/lxc/db\n", Container("lxc", "db")),
        # not containers: a service, podman's own monitor, a user session, a bare /docker path
        ("0::/system.slice/ssh.service\n", None),
        (f"0::/machine.slice/libpod-conmon-{ID}.scope\n", None),
        ("0::/user.slice/user-1000.slice/session-4.scope\n", None),
        ("4:memory:/docker/not-an-id\n", None),
        # names a user could give a delegated cgroup of its own: not taken for an engine's
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/machine-host.scope\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/lxc.payload.web\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/lxc/web\n", None),
        ("", None),
    ],
)
def test_containers_are_recognised_from_their_cgroup(cgroup: str, expected: Container | None) -> None:
    assert container_from_cgroup(cgroup) == expected


def test_namespace_names() -> None:
    assert make_netns(7, host=True) == NetNs(7, "host", True, None)
    assert make_netns(7, host=False).name == "netns:[7]"
    assert make_netns(7, host=False, bound="blue", container=Container("docker", ID)).name == "blue"
    assert make_netns(7, host=False, container=Container("docker", ID)).name == f"docker:{ID[:12]}"
    assert make_netns(7, host=False, container=Container("podman", ID, "web")).name == "web"
    # Only portwatch's own namespace is ever called host: not a container or ip netns named so.
    assert make_netns(7, host=False, container=Container("docker", ID, "host")).name == "netns:[7]"
    assert make_netns(7, host=False, bound="host").name == "netns:[7]"
    assert selects(make_netns(1, host=True), "host") and selects(make_netns(1, host=True), "1")
    assert not selects(make_netns(7, host=False, bound="host"), "host")
    web = make_netns(7, host=False, container=Container("podman", ID, "web"))
    for wanted in ("web", "7", "netns:[7]", ID, ID[:12]):
        assert selects(web, wanted)
    assert not selects(web, "host") and not selects(web, "8")
    assert selects(None, "host")


def test_engine_state_gives_container_names() -> None:
    """Captured shapes of podman's containers.json and docker's config.v2.json."""
    podman = [{"id": ID, "names": ["web"], "image": "x"}, {"id": "other", "names": []}, "junk"]
    assert podman_names(podman) == {ID: "web"}
    assert podman_names({"not": "a list"}) == {}
    assert docker_name({"ID": ID, "Name": "/db", "Config": {}}) == "db"
    assert docker_name({"Name": 3}) is None
    assert docker_name(None) is None


def _process(*argv: str) -> Process:
    return Process(1, "x", argv[0] if argv else None, tuple(argv), 0, "root", None)


def test_docker_proxy_says_where_it_forwards() -> None:
    proxy = ("/usr/bin/docker-proxy", "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "8080",
             "-container-ip", "172.17.0.2", "-container-port", "80")
    assert forwards_to(_process(*proxy)) == "172.17.0.2:80"
    assert forwards_to(_process("docker-proxy", "-container-ip=fd00::2", "-container-port=443")) == "[fd00::2]:443"
    assert forwards_to(_process("nginx", "-container-ip", "1.2.3.4", "-container-port", "80")) is None
    assert forwards_to(_process("docker-proxy", "-container-ip", "1.2.3.4")) is None
    assert forwards_to(_process()) is None


def test_reserved_rules_hold_on_the_host_unless_they_name_namespaces() -> None:
    host = make_netns(1, host=True)
    blue = make_netns(2, host=False, bound="blue")
    squatter = Process(5, "squat", "/bin/squat", ("squat",), 0, "root", None)

    def listener(netns: NetNs | None) -> Listener:
        return Listener(Socket(Proto.TCP, 4, "0.0.0.0", 22, 9, 0), (squatter,), netns=netns)

    host_only = Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="sshd"),))
    everywhere = Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="sshd"),), netns="*")
    named = Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="sshd"),), netns="bl*")
    assert evaluate(host_only, listener(host)) is not None
    assert evaluate(host_only, listener(None)) is not None  # namespace unknown: the host's
    assert evaluate(host_only, listener(blue)) is None
    assert evaluate(everywhere, listener(blue)) is not None
    assert evaluate(everywhere, listener(host)) is not None
    assert evaluate(named, listener(blue)) is not None
    assert evaluate(named, listener(host)) is None


def test_events_name_the_namespace() -> None:
    blue = make_netns(9, host=False, bound="blue", container=Container("podman", ID, "web"))
    listener = Listener(Socket(Proto.TCP, 4, "0.0.0.0", 80, 5, 0), (_process("nginx"),), netns=blue)
    kind, fields = change_event(Change(ChangeKind.CLOSED, listener), None)
    assert (fields["netns"], fields["netns_id"], fields["container"]) == ("blue", 9, f"podman:{ID}")
    assert describe(kind, fields) == "listener tcp/*:80 in netns blue closed (was held by x[1] user root)"
    fields["reason"] = "netns_gone"
    assert describe(kind, fields).endswith("(was held by x[1] user root): its network namespace is gone")
    _, on_host = change_event(Change(ChangeKind.OPENED, listener._replace(netns=make_netns(1, host=True))), None)
    assert describe("listener_opened", on_host) == "new listener tcp/*:80 held by x[1] user root"


def test_config_netns_keys() -> None:
    config = parse_config("netns: host\nreserved:\n  - name: a\n    ports: [22]\n    netns: '*'\n", "/c.yaml")
    assert config.netns == "host"
    assert config.reserved[0].netns == "*"
    assert parse_config("", "/c.yaml").netns == "all"
    with pytest.raises(ConfigError) as caught:
        parse_config("netns: everywhere\nreserved:\n  - name: a\n    ports: [22]\n    netns: 3\n", "/c.yaml")
    assert caught.value.problems == [
        "/c.yaml:1: netns: unknown value 'everywhere'; expected all or host",
        '/c.yaml:5: reserved[0].netns: must be a glob over namespace names, "*" for all, not the integer 3',
    ]


# -- real namespaces -------------------------------------------------------------------------

@pytest.fixture
def named_netns() -> Iterator[str]:
    """An `ip netns` namespace of this test's own, deleted at the end."""
    name = f"pwtest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _ns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _tcp(port: int, address: str = "127.0.0.1") -> list[dict[str, Any]]:
    return [{"proto": "tcp", "family": 6 if ":" in address else 4, "address": address, "port": port}]


@pytest.mark.root
def test_views_show_every_namespace_when_asked(holders: Callable[..., Holder], named_netns: str) -> None:
    """The same port in three namespaces: three listeners, each named; by default only the host's."""
    port = free_port()
    on_host = holders(_tcp(port))
    unshared = holders(_tcp(port), prefix=["unshare", "--net"])
    named = holders(_tcp(port), prefix=["ip", "netns", "exec", named_netns])

    every = run_cli("who", str(port), "--all-netns", "--json")
    assert every.returncode == 0, every.stderr
    by_pid = {x["processes"][0]["pid"]: x for x in json.loads(every.stdout)}
    assert set(by_pid) == {on_host.pid, unshared.pid, named.pid}
    assert by_pid[on_host.pid]["netns"] == {"id": _ns_inode("self"), "name": "host", "host": True, "container": None}
    inode = _ns_inode(unshared.pid)
    assert by_pid[unshared.pid]["netns"] == {"id": inode, "name": f"netns:[{inode}]", "host": False, "container": None}
    assert by_pid[named.pid]["netns"]["name"] == named_netns
    assert by_pid[named.pid]["netns"]["id"] == os.stat(f"/run/netns/{named_netns}").st_ino
    assert by_pid[named.pid]["inode"] == named.inode

    default = run_cli("who", str(port), "--json")
    assert [x["processes"][0]["pid"] for x in json.loads(default.stdout)] == [on_host.pid]
    assert json.loads(default.stdout)[0]["netns"]["name"] == "host"  # JSON always says

    table = run_cli("list", "--all-netns", "--tcp")
    assert table.stdout.splitlines()[0].split()[:3] == ["NETNS", "PROTO", "LOCAL"]
    rows = [line.split() for line in table.stdout.splitlines() if str(port) in line]
    assert sorted(row[0] for row in rows) == sorted(["host", f"netns:[{inode}]", named_netns])

    for wanted, pid in ((named_netns, named.pid), (str(inode), unshared.pid), ("host", on_host.pid)):
        one = run_cli("who", str(port), "--netns", wanted, "--json")
        assert [x["processes"][0]["pid"] for x in json.loads(one.stdout)] == [pid], wanted
    ps = run_cli("ps", "--netns", named_netns, "--json")
    ports = {p["port"]: p["netns"]["name"] for e in json.loads(ps.stdout) for p in e["ports"]}
    assert ports == {port: named_netns}
    missing = run_cli("list", "--netns", "no-such-namespace")
    assert missing.returncode == 1
    assert missing.stderr == "portwatch: no network namespace 'no-such-namespace'\n"


@pytest.mark.root
def test_entering_a_namespace_and_reading_its_proc_tables_give_the_same_rows(
    holders: Callable[..., Holder], named_netns: str,
) -> None:
    """sock_diag inside (setns, as root) and /proc/<pid>/net (no setns) list the same sockets;
    the /proc path sees a listener opened and closed by another process of the namespace."""
    specs = [{"proto": "tcp", "family": 4, "address": "127.0.0.1"},
             {"proto": "tcp", "family": 6, "address": "::", "v6only": 0},
             {"proto": "udp", "family": 4, "address": "0.0.0.0"},
             {"proto": "udp", "family": 6, "address": "::1"}]
    subprocess.run(["ip", "-n", named_netns, "link", "set", "lo", "up"], check=True)  # for ::1
    inside = holders(specs, prefix=["ip", "netns", "exec", named_netns])
    inode = _ns_inode(inside.pid)
    procfs = ProcFS()

    def rows(spaces: Namespaces) -> list[Socket]:
        listing = spaces.listing((Proto.TCP, Proto.UDP), (4, 6))
        assert listing.table.complete, listing.table.errors
        return sorted((s for s in listing.table.sockets if s.inode in listing.netns_of
                       and listing.netns_of[s.inode].id == inode), key=lambda s: s.inode)

    host = own_netns(procfs)
    assert host is not None
    entering = Namespaces(procfs, SocketLister(procfs).list, host, enter=None)
    reading = Namespaces(procfs, SocketLister(procfs).list, host, enter=False)
    try:
        for spaces in (entering, reading):
            assert spaces.look([inside.pid]) == {inode}
        by_diag, by_proc = rows(entering), rows(reading)
        assert entering.enter is True  # root here: it entered
        assert by_diag == by_proc
        assert {s.inode for s in by_proc} == {s["inode"] for s in inside.sockets}

        # A second process of the namespace opens a listener, then closes it: the /proc path
        # reads the table again because the namespace's count of sockets in use changed.
        port = free_port()
        other = holders(_tcp(port), prefix=["nsenter", f"--net=/proc/{inside.pid}/ns/net"])
        assert other.inode in {s.inode for s in rows(reading)}
        assert rows(entering) == rows(reading)
        other.stop()
        assert other.inode not in {s.inode for s in rows(reading)}
    finally:
        entering.close()
        reading.close()


def _config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.root
def test_the_daemon_watches_every_namespace(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder], named_netns: str,
) -> None:
    """Listeners in new namespaces are reported with their namespace; the same port on the host
    and in a namespace are two listeners that never replace each other; host-only rules leave
    namespaces alone, `netns: "*"` does not; a namespace that disappears closes its listeners
    with reason netns_gone, a process leaving a bound namespace closes its listener plainly."""
    port, everywhere = free_port(), free_port()
    cfg = _config(tmp_path / "pw.yaml", (
        "interval: 0.2\n"
        "reserved:\n"
        f"  - {{name: hostonly, ports: [{port}], allow: [{{comm: nobody-allowed}}]}}\n"
        f"  - {{name: everywhere, ports: [{everywhere}], allow: [{{comm: nobody-allowed}}], netns: '*'}}\n"
    ))
    d = daemons(cfg)
    d.started()
    on_host = holders(_tcp(port), name=b"hostside")
    d.wait_event("reserved_port_taken", pid=on_host.pid, rule="hostonly")
    inside = holders(_tcp(port), prefix=["unshare", "--net"], name=b"inside")
    inode = _ns_inode(inside.pid)
    opened = d.wait_event("listener_opened", pid=inside.pid)
    assert (opened["netns"], opened["netns_id"], opened.get("container")) == (f"netns:[{inode}]", inode, None)
    assert opened.get("rule") is None  # the host's rule is not this namespace's

    squatter = holders(_tcp(everywhere), prefix=["ip", "netns", "exec", named_netns], name=b"squat")
    taken = d.wait_event("reserved_port_taken", pid=squatter.pid)
    assert (taken["rule"], taken["netns"]) == ("everywhere", named_netns)

    # The squatter leaves its bound namespace: a plain close, the namespace stays.
    squatter.stop()
    closed = d.wait_event("listener_closed", inode=squatter.inode)
    assert "reason" not in closed
    # The unshared namespace's only process exits: the namespace is gone with its listener.
    inside.stop()
    gone = d.wait_event("listener_closed", inode=inside.inode)
    assert gone["reason"] == "netns_gone" and gone["netns"] == f"netns:[{inode}]"
    # All along, the host's listener on the same port was never closed, reopened or judged again.
    assert d.count("listener_closed", inode=on_host.inode) == 0
    assert d.count("listener_opened", inode=on_host.inode) == 1
    assert d.count("reserved_port_taken", pid=inside.pid) == 0
    assert d.count("reserved_port_taken", pid=on_host.pid) == 1


@pytest.mark.root
def test_netns_host_restricts_the_daemon_to_its_own(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    port = free_port()
    d = daemons(_config(tmp_path / "pw.yaml", "interval: 0.2\nnetns: host\n"))
    d.started()
    inside = holders(_tcp(port), prefix=["unshare", "--net"])
    marker = holders(_tcp(free_port()))  # a host listener opened after it: reported, so a scan ran
    d.wait_event("listener_opened", pid=marker.pid)
    assert d.count("listener_opened", pid=inside.pid) == 0


@pytest.mark.root
def test_a_container_namespace_is_named_after_its_cgroup(holders: Callable[..., Holder]) -> None:
    """A process in a cgroup laid out as Docker's systemd driver lays it out (a real cgroup and
    a real namespace; no engine runs here), in a network namespace of its own."""
    cleanup: list[Path] = []
    ident = secrets.token_hex(32)
    try:
        procs = make_cgroups(f"docker-{ident}.scope", cleanup)
        join = " ".join(f"echo $$ > {p};" for p in procs)
        port = free_port()
        inside = holders(_tcp(port), prefix=["sh", "-c", f'{join} exec "$@"', "sh", "unshare", "--net"])
        out = run_cli("who", str(port), "--all-netns", "--json")
        (listener,) = json.loads(out.stdout)
        assert listener["processes"][0]["pid"] == inside.pid
        assert listener["netns"]["container"] == {"engine": "docker", "id": ident, "name": None}
        assert listener["netns"]["name"] == f"docker:{ident[:12]}"
        inside.stop()
    finally:
        assert remove_cgroups(cleanup) == []


def test_the_state_file_keeps_each_listener_namespace(tmp_path: Path) -> None:
    host = make_netns(1, host=True)
    web = make_netns(9, host=False, container=Container("podman", ID, "web"))
    sshd = Process(5, "sshd", "/usr/sbin/sshd", ("sshd",), 0, "root", "ssh.service")
    listeners = {
        i: Listener(Socket(Proto.TCP, 4, "0.0.0.0", 22, i, 0), (sshd,), netns=netns)
        for i, netns in ((100, host), (101, web), (102, None))
    }
    store = StateStore(str(tmp_path))
    store.save(Snapshot(listeners), {}, "2026-12-05T00:00:00+00:00")
    saved = store.load()
    assert saved is not None
    assert {i: x.netns for i, x in saved.snapshot.listeners.items()} == {100: host, 101: web, 102: None}


HOLD_FROM_OUTSIDE = r"""
import json, os, socket, sys
from portwatch.libc import CLONE_NEWNET, setns
home = os.open("/proc/self/ns/net", os.O_RDONLY)
setns(os.open(sys.argv[1], os.O_RDONLY), CLONE_NEWNET)
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen()
setns(home, CLONE_NEWNET)  # back home: the socket stays in the other namespace
print(json.dumps({"pid": os.getpid(), "inode": os.fstat(s.fileno()).st_ino}), flush=True)
sys.stdin.read()
"""


@pytest.mark.root
def test_a_namespace_that_cannot_be_read_keeps_what_is_still_held(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder], named_netns: str,
) -> None:
    """Without CAP_SYS_ADMIN (as under the shipped unit) a bound namespace whose last process
    left cannot be read: a listener held in it from outside is kept while its holder holds it,
    and the daemon says once that the namespace is not read."""
    d = daemons(_config(tmp_path / "pw.yaml", "interval: 0.2\n"),
                prefix=["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"])
    d.started()
    member = subprocess.Popen(["ip", "netns", "exec", named_netns, "sleep", "300"])
    outside = subprocess.Popen([sys.executable, "-c", HOLD_FROM_OUTSIDE, f"/run/netns/{named_netns}",
                                str(free_port())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert outside.stdout is not None
        held = json.loads(outside.stdout.readline())
        opened = d.wait_event("listener_opened", inode=held["inode"])
        assert (opened["pid"], opened["netns"]) == (held["pid"], named_netns)
        member.kill()
        member.wait()
        said = d.wait_event("degraded", netns=named_netns)
        assert "no process inside" in said["reason"]
        # Scans after that one (a host listener opened later is reported) close nothing either.
        marker = holders(_tcp(free_port()))
        d.wait_event("listener_opened", pid=marker.pid)
        assert d.count("listener_closed", inode=held["inode"]) == 0
        assert outside.stdin is not None
        outside.stdin.close()
        outside.wait(10)
        d.wait_event("listener_closed", inode=held["inode"])
    finally:
        for proc in (member, outside):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if outside.stdout is not None:
            outside.stdout.close()


@pytest.mark.root
def test_a_reload_to_the_host_alone_says_why_the_others_close(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    cfg = _config(tmp_path / "pw.yaml", "interval: 0.2\n")
    d = daemons(cfg)
    d.started()
    inside = holders(_tcp(free_port()), prefix=["unshare", "--net"])
    d.wait_event("listener_opened", pid=inside.pid)
    replacement = tmp_path / "new.yaml"
    replacement.write_text("interval: 0.2\nnetns: host\n")
    replacement.rename(cfg)
    d.wait_event("config_reloaded")
    closed = d.wait_event("listener_closed", inode=inside.inode)
    assert closed["reason"] == "netns_unwatched"
