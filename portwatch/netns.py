"""Naming network namespaces: `host`, an `ip netns` name, a container, or `netns:[<inode>]`.

A namespace is identified by the inode of /proc/<pid>/ns/net (or of the file
`ip netns add` bind-mounts under /run/netns). A container is recognised from
its processes' cgroup path, which every engine names after the container
(`docker-<id>.scope`, `libpod-<id>.scope`, `cri-containerd-<id>.scope`,
`crio-<id>.scope`, `machine-<name>.scope` for systemd-nspawn, `lxc.payload.<name>`),
and its name is read from the engine's own state where that is one small
file (portwatch.namespaces reads it; the parsers here are pure).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence

from portwatch.model import Container, NetNs, Process

HOST_NAME = "host"

_ID = r"[0-9a-f]{64}"
# (engine, pattern over one cgroup path component, the parent it must have: None for any); the
# first group is the id. Names that are not ids are taken only where the engine (root) puts
# them, since a user with a delegated cgroup can make one of any name under its own.
_SCOPES = (
    ("docker", re.compile(rf"^docker-({_ID})\.scope$"), None),
    ("podman", re.compile(rf"^libpod-({_ID})(?:\.scope)?$"), None),
    ("containerd", re.compile(rf"^cri-containerd-({_ID})\.scope$"), None),
    ("crio", re.compile(rf"^crio-({_ID})\.scope$"), None),
    ("nspawn", re.compile(r"^machine-(.+)\.scope$"), "machine.slice"),
    ("lxc", re.compile(r"^lxc\.payload\.(.+)$"), ""),
)
# cgroupfs drivers, at the top of the tree: /docker/<id>, /lxc/<name>
_PARENTS = {"docker": "docker", "lxc": "lxc"}
_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def container_from_cgroup(text: str) -> Container | None:
    """The container a process runs in, from its /proc/<pid>/cgroup, or None.

    Every hierarchy's path is looked at, innermost component first: engines
    name the container's cgroup alike in each (v1 and v2).
    """
    for line in text.split("\n"):
        _hierarchy, _controllers, path = line.partition(":")[2].partition(":")
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts) - 1, -1, -1):
            found = _container_at(parts, i)
            if found is not None:
                return found
    return None


def _container_at(parts: Sequence[str], i: int) -> Container | None:
    part, above = parts[i], "/".join(parts[:i])
    for engine, pattern, parent in _SCOPES:
        match = pattern.match(part)
        if match is not None and (parent is None or above == parent):
            ident = match.group(1)
            if engine == "nspawn":  # systemd escapes a machine's name: `-` is `\x2d`
                ident = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), ident)
            return Container(engine, ident)
    outer = _PARENTS.get(above)
    if outer is not None and (outer != "docker" or re.fullmatch(_ID, part)):
        return Container(outer, part)
    return None


def namespace_name(
    inode: int, *, host: bool, bound: str | None = None, container: Container | None = None
) -> str:
    """The name a namespace is shown by: see NetNs. Only portwatch's own is ever `host`."""
    if host:
        return HOST_NAME
    name = bound
    if name is None and container is not None:
        name = container.name or f"{container.engine}:{container.id[:12]}"
    return name if name is not None and name != HOST_NAME else f"netns:[{inode}]"


def make_netns(
    inode: int, *, host: bool, bound: str | None = None, container: Container | None = None
) -> NetNs:
    name = namespace_name(inode, host=host, bound=bound, container=container)
    return NetNs(inode, name, host, container)


def selects(netns: NetNs | None, wanted: str) -> bool:
    """`--netns NAME|ID`: the namespace's name, its inode, or `netns:[<inode>]`."""
    if netns is None or netns.host:
        return wanted == HOST_NAME or (netns is not None and wanted in (str(netns.id), f"netns:[{netns.id}]"))
    return wanted in (netns.name, str(netns.id), f"netns:[{netns.id}]") or (
        netns.container is not None and wanted in (netns.container.id, netns.container.id[:12])
    )


def forwards_to(process: Process) -> str | None:
    """Where Docker's userland proxy forwards the host port it holds: `address:port` inside the
    container, from its command line (`docker-proxy -proto tcp -host-ip … -container-ip
    172.17.0.2 -container-port 80`); None for any other process."""
    argv = process.cmdline
    if not argv or posixpath.basename(argv[0]) != "docker-proxy":
        return None
    options = _options(argv[1:])
    address, port = options.get("container-ip"), options.get("container-port")
    if address is None or port is None or not port.isdigit():
        return None
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _options(args: Iterable[str]) -> dict[str, str]:
    """`-name value` and `-name=value` pairs (Go's flag syntax)."""
    found: dict[str, str] = {}
    pending: str | None = None
    for arg in args:
        if pending is not None:
            found[pending] = arg
            pending = None
        elif arg.startswith("-"):
            name, sep, value = arg.lstrip("-").partition("=")
            if sep:
                found[name] = value
            else:
                pending = name
    return found


def podman_names(data: object) -> dict[str, str]:
    """id -> name from podman's containers.json (a list of {"id", "names": [...]})."""
    names: dict[str, str] = {}
    if isinstance(data, list):
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                listed = entry.get("names")
                if isinstance(listed, list) and listed and isinstance(listed[0], str):
                    names[entry["id"]] = listed[0]
    return names


def docker_name(data: object) -> str | None:
    """The name from docker's config.v2.json ({"Name": "/web", ...})."""
    name = data.get("Name") if isinstance(data, dict) else None
    return name.lstrip("/") or None if isinstance(name, str) else None
