"""The `portwatch` command: a thin layer over the library.

`main(argv) -> exit status`; nothing below it calls sys.exit. `console` is
the installed command and `python -m portwatch`: `main` plus a quick exit.
A view built from a socket table it could not read prints what it has, names
each unread table on stderr and exits 65: it never answers "nothing" about a
table it has not seen.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from portwatch import DEFAULT_CONFIG, __version__
from portwatch.access import advice
from portwatch.activation import Unavailable, UnitCache, match
from portwatch.model import Listener, NetNs, Proto, is_manager
from portwatch.output import ExitStatus, print_json, print_table, terminal_columns
from portwatch.proc import ProcFS
from portwatch.procfd import AccessDenied, ProcessGone
from portwatch.procfs import ProcParseError
from portwatch.render import (
    LISTENER_HEADERS,
    LISTENER_HEADERS_NETNS,
    PROCESS_HEADERS,
    ProcessPorts,
    listener_json,
    listener_rows,
    process_ports_json,
    process_rows,
)
from portwatch.scan import SocketLister, Source, full_scan, own_netns, socket_units
from portwatch.sockdiag import SockDiagUnavailable
from portwatch.sockdiag import v6only_flags as sockdiag_v6only
from portwatch.text import escape
from portwatch.walk import Walk

if TYPE_CHECKING:
    from portwatch.baseline import Baseline
    from portwatch.config import Config
    from portwatch.namespaces import Namespaces


DESCRIPTION = """\
Which processes hold which listening ports (every holder of a shared socket),
and an alarm when a reserved port is taken by a process that may not hold it.

examples:
  portwatch list --tcp        every TCP listener with every process holding it
  portwatch who 80            who holds TCP port 80 (exit status 1 when nobody does)
  portwatch ps --json         every process with the ports it listens on, as JSON
  portwatch baseline -o /etc/portwatch.yaml   a policy from what listens now
  portwatch check --config /etc/portwatch.yaml
  portwatch explain --config /etc/portwatch.yaml   what the daemon would decide
  portwatch run --config /etc/portwatch.yaml
  portwatch history 8080 --at "2026-12-01 15:00"   who held it then (from the journal)

Run as root (or with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH) to name the owner
of every socket. Exit status: 0 ok, 1 `who` found nothing (`why`: cannot bind,
`explain`: a reserved port is taken, `history`: no entry), 2 usage error,
65 /proc, a socket table or the journal could not be read, 70 internal error,
74 the output could not be written, 78 invalid config."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(ExitStatus.USAGE)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes one for every add_argument, and its own asks shutil for the width,
        # an import on the views' start-up path for nothing else. Raw: descriptions hold examples.
        return argparse.RawDescriptionHelpFormatter(prog=self.prog, width=terminal_columns() - 2)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number 1-65535")
    return int(text)


def _port_list(text: str) -> tuple[tuple[int, int], ...]:
    """`22,80,8000-8099` as inclusive (first, last) ranges."""
    spans = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise argparse.ArgumentTypeError(f"invalid port list {text!r}: expected e.g. 22,80,8000-8099")
        low, high = _port(first), _port(last) if dash else _port(first)
        if low > high:
            raise argparse.ArgumentTypeError(f"range {part.strip()!r} is reversed")
        spans.append((low, high))
    return tuple(spans)


def _address(text: str) -> str:
    import ipaddress  # noqa: PLC0415 (only `why` takes an address)

    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="portwatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"portwatch {__version__}")
    parser.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, title="commands")

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=f"{help_text}\n\nexample:\n  {example}")

    def view(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        p = command(name, help_text, example)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument(
            "--source",
            choices=[s.value for s in Source],
            default=Source.AUTO.value,
            help="where to list sockets: sock_diag netlink, /proc/net, or netlink with "
            "/proc/net as the fallback (default)",
        )
        return p

    def netns_options(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--all-netns", action="store_true",
            help="every network namespace (containers, `ip netns`), with a NETNS column; "
            "by default only portwatch's own, as ss shows",
        )
        where.add_argument(
            "--netns", metavar="NAME|ID",
            help="one network namespace: its `ip netns` or container name, container id, or inode",
        )

    p_list = view(
        "list", "every listening socket with every process holding it", "portwatch list --udp -6"
    )
    netns_options(p_list)
    proto = p_list.add_mutually_exclusive_group()
    proto.add_argument("--tcp", action="store_true", help="TCP listeners only")
    proto.add_argument("--udp", action="store_true", help="UDP sockets only")
    fam = p_list.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", dest="ipv6", action="store_true", help="IPv6 only")
    p_list.add_argument(
        "--all", action="store_true",
        help="also the ephemeral UDP sockets of clients (unconnected, on a port the kernel hands out "
        "to clients: net.ipv4.ip_local_port_range, minus ip_local_reserved_ports), hidden by default",
    )
    p_list.add_argument(
        "--config", default=None,
        help="the config whose reserved UDP ports are never hidden (default /etc/portwatch.yaml, "
        "when it exists)",
    )

    p_who = view(
        "who", "every process holding a listener on PORT (exit status 1 when none)", "portwatch who 22"
    )
    p_who.add_argument("port", type=_port, metavar="PORT", help="a port number, 1-65535")
    p_who.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    netns_options(p_who)

    netns_options(view("ps", "every process with the ports it listens on", "portwatch ps --json"))

    p_why = view(
        "why", "can a new server bind ADDR:PORT now, and if not, what stops it (exit status 1 when "
        "it cannot): the listeners in the way, confirmed by a real bind()",
        "portwatch why 8080 --address 127.0.0.1",
    )
    p_why.add_argument("port", type=_port, metavar="PORT", help="a port number, 1-65535")
    p_why.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    p_why.add_argument(
        "--address", type=_address, default="0.0.0.0",  # noqa: S104 (the question is about every address)
        help="the address the server would bind (default 0.0.0.0; [::] or :: for IPv6, which "
        "also takes IPv4 unless net.ipv6.bindv6only is set)",
    )

    _policy_commands(view, command)

    p_check = command(
        "check", "validate the config file: ok, or one PATH:LINE: problem line each (exit status 78)",
        "portwatch check --config /etc/portwatch.yaml",
    )
    p_check.add_argument("--config", default=None, help="config file (default /etc/portwatch.yaml)")

    p_run = command(
        "run", "watch listening sockets and enforce reserved ports (the systemd service)",
        "portwatch run --config etc/portwatch.yaml --log-format console",
    )
    p_run.add_argument("--config", default=None, help="config file (default /etc/portwatch.yaml)")
    p_run.add_argument(
        "--log-format",
        choices=["auto", "json", "console", "journal"],
        default="auto",
        help="journal when stdout/stderr is the journal, console on a TTY, else JSON lines",
    )
    p_run.add_argument(
        "--source", choices=[s.value for s in Source], default=Source.AUTO.value,
        help="where to list sockets (default: netlink, /proc/net as the fallback)",
    )
    p_run.add_argument("--state-dir", default=None, help="where to keep the last snapshot")
    p_run.add_argument(
        "--no-proc-events", action="store_true",
        help="do not use the proc connector to rescan early when processes start",
    )
    return parser


Maker = Callable[[str, str, str], argparse.ArgumentParser]


def _policy_commands(view: Maker, command: Maker) -> None:
    """baseline, explain and history: from the host to a policy, its dry run, and the journal."""
    p_baseline = view(
        "baseline", "a complete, commented config reserving today's listening ports for today's "
        "owners (to stdout, or -o FILE)",
        "portwatch baseline -o /etc/portwatch.yaml",
    )
    p_baseline.add_argument(
        "--ports", type=_port_list, metavar="LIST",
        help="only these ports, e.g. 22,80,8000-8099 (default: the ports below 1024 and every port "
        "a systemd service holds)",
    )
    p_baseline.add_argument("--all", action="store_true", help="every listening port")
    p_baseline.add_argument(
        "--config", metavar="EXISTING", default=None,
        help="keep this config's rules, hooks and settings and add rules only for ports it does not "
        "reserve yet (stderr says which)",
    )
    p_baseline.add_argument("-o", "--output", metavar="FILE", default=None,
                            help="write the config to FILE (atomically) instead of stdout")

    p_explain = view(
        "explain", "the policy's dry run on this host: for each listener, its rule, which allow "
        "entry each holder matches (or why none does), and the daemon's verdict (exit status 1 "
        "when a reserved port is taken)",
        "portwatch explain 22 --config /etc/portwatch.yaml",
    )
    p_explain.add_argument("port", type=_port, nargs="?", metavar="PORT", help="only the listeners on PORT")
    p_explain.add_argument("--udp", action="store_true", help="UDP instead of TCP (with PORT)")
    p_explain.add_argument("--config", default=None, help="config file (default /etc/portwatch.yaml)")

    p_history = command(
        "history", "a port's timeline read back from portwatch's entries in the journal: opened, "
        "owner changed, closed, taken, conflicts; --at: who held it then",
        "portwatch history 8080 --since yesterday",
    )
    p_history.add_argument("port", type=_port, nargs="?", metavar="PORT", help="only this port")
    p_history.add_argument("--udp", action="store_true", help="UDP instead of TCP (with PORT)")
    p_history.add_argument("--since", metavar="TIME", help="entries from TIME on (journalctl's forms: "
                           '"2026-12-01 15:00", yesterday, @EPOCH; a relative one as --since=-2h)')
    p_history.add_argument("--until", metavar="TIME", help="entries up to TIME")
    p_history.add_argument("--at", metavar="TIME", help="who held the port(s) at TIME (not with --since or "
                           "--until: it reads every entry before TIME)")
    p_history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    where = p_history.add_mutually_exclusive_group()
    where.add_argument("--directory", metavar="DIR",
                       help="read the journal files in DIR (one copied from another host)")
    where.add_argument("--file", metavar="FILE", action="append",
                       help="read this journal file (may be given more than once)")
    p_history.add_argument("--machine", metavar="ID", help="only the entries of this machine (its "
                           "/etc/machine-id): a journal directory from systemd-journal-remote holds many")
    p_history.add_argument(
        "--unit", default="portwatch.service",
        help="the unit the daemon runs as (default portwatch.service): only its entries are read, "
        "as journald vouches for a unit and any process can write PORTWATCH_* fields",
    )


def console(walk: Walk | None = None) -> NoReturn:
    """The `portwatch` command: `main`, then, for the one-shot views, a quick exit.

    `walk`: a walk of /proc begun by portwatch.__main__ before this module
    was imported, used by `list` and `who` and dropped otherwise.

    Freeing every object at interpreter exit is a measurable share of a
    view's run on a host with many listeners. The views need nothing from
    that teardown (no threads, atexit work or temporary files), so they
    flush their output and leave with os._exit. The daemon exits normally.
    """
    try:
        args = build_parser().parse_args()
        if walk is not None and (args.command not in ("list", "who") or args.proc != walk.root):
            walk.abandon()
            walk = None
        status = _main(args, walk)
    finally:
        if walk is not None:
            walk.abandon()  # after an error; a finished walk has nothing left to stop
    if args.command == "run":
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # reader gone, or stream closed
            pass
        except OSError as exc:
            status = _os_error(exc)
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    return _main(build_parser().parse_args(argv))


def _main(args: argparse.Namespace, walk: Walk | None = None) -> int:
    try:
        return _dispatch(args, walk)
    except BrokenPipeError:
        # `portwatch list | head`: the reader left; not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitStatus.OK
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _os_error(exc)


def _os_error(exc: OSError) -> int:
    """One line for what could not be read (/proc) or written (the output: a full disk)."""
    if exc.filename is None:
        sys.stderr.write(f"portwatch: cannot write the output: {exc.strerror or exc}\n")
        return ExitStatus.IO_ERROR
    sys.stderr.write(f"portwatch: cannot read {exc.filename}: {exc.strerror or exc}\n")
    return ExitStatus.DATA_ERROR


def _dispatch(args: argparse.Namespace, walk: Walk | None) -> int:
    if args.command == "check":
        return _check(args)
    if args.command == "history":
        from portwatch.history import command  # noqa: PLC0415 (only this command reads the journal)

        return command(args)
    if args.command == "run":
        from portwatch.daemon import run_from_args  # noqa: PLC0415 (keeps one-shot views light)

        return run_from_args(args)
    procfs = ProcFS(args.proc)
    lister = SocketLister(procfs, Source(args.source))
    # A one-shot view makes many small objects and no cycles worth collecting before it
    # exits: the cyclic collector would only cost time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if args.command == "ps":
            return _ps(args, procfs, lister)
        if args.command == "why":
            return _why(args, procfs, lister)
        if args.command == "baseline":
            return _baseline(args, procfs, lister)
        if args.command == "explain":
            return _explain(args, procfs, lister)
        return _listeners(args, procfs, lister, walk)
    except (ProcParseError, SockDiagUnavailable) as exc:
        sys.stderr.write(f"portwatch: {exc}\n")
        return ExitStatus.DATA_ERROR
    finally:
        if gc_was_enabled:
            gc.enable()


def _check(args: argparse.Namespace) -> int:
    if _load(args.config) is None:
        return ExitStatus.CONFIG_ERROR
    sys.stdout.write("ok\n")
    return ExitStatus.OK


def _selection(args: argparse.Namespace) -> tuple[tuple[Proto, ...], tuple[int, ...]]:
    if args.command == "who":
        return ((Proto.UDP,) if args.udp else (Proto.TCP,)), (4, 6)
    protocols: tuple[Proto, ...] = (Proto.TCP, Proto.UDP)
    if args.tcp or args.udp:
        protocols = (Proto.TCP,) if args.tcp else (Proto.UDP,)
    families = (4,) if args.ipv4 else (6,) if args.ipv6 else (4, 6)
    return protocols, families


def _namespaces(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister) -> Namespaces | None:
    """Every network namespace, when the view asks for more than its own."""
    if not (args.all_netns or args.netns):
        return None
    from portwatch.namespaces import Namespaces  # noqa: PLC0415 (only these views need it)

    host = own_netns(procfs)
    if host is None:
        raise OSError(errno.ENOENT, "No such file or directory", f"{procfs.root}/self/ns/net")
    return Namespaces(procfs, lister.list, host)


def _in_netns(args: argparse.Namespace, spaces: Namespaces | None) -> Callable[[NetNs | None], bool] | None:
    """The `--netns` filter; None when every listed namespace is shown."""
    if spaces is None or not args.netns:
        return None
    from portwatch.netns import selects  # noqa: PLC0415

    return lambda netns: selects(netns, args.netns)


def _warn_namespaces(spaces: Namespaces | None) -> None:
    for name in spaces.unread if spaces is not None else ():
        sys.stderr.write(
            f"portwatch: network namespace {escape(name)} not read: no process is inside it, and "
            f"entering it was refused ({spaces.enter_problem if spaces else 'setns'}); a socket "
            "held in it from outside is not shown\n"
        )


def _listeners(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister, walk: Walk | None) -> int:
    protocols, families = _selection(args)
    spaces = _namespaces(args, procfs, lister)
    snap, unread = full_scan(procfs, lister, protocols, families, walk=walk, namespaces=spaces)
    wanted = _in_netns(args, spaces)
    if spaces is not None and wanted is not None and not any(map(wanted, [spaces.host, *spaces.others])):
        sys.stderr.write(f"portwatch: no network namespace {escape(args.netns)!r}\n")
        return ExitStatus.NOT_FOUND
    if args.command == "who" or wanted is not None:
        asked = {i: x for i, x in snap.listeners.items()
                 if (args.command != "who" or x.socket.port == args.port)
                 and (wanted is None or wanted(x.netns))}
        snap = snap._replace(listeners=asked)
    units = UnitCache(socket_units)
    listeners = units.apply(snap).sorted()
    clients = _ephemeral(procfs, listeners)
    if clients and args.command == "list" and not args.all:
        reserved = _reserving(args.config)
        hidden = {x.socket.inode for x in listeners if x.socket.inode in clients
                  and reserved is not None and not reserved(Proto.UDP, x.socket.port)}
        if hidden:
            listeners = [x for x in listeners if x.socket.inode not in hidden]
            _say_hidden(len(hidden), "--all shows them")
    _warn_fallback(lister)
    _warn_unattributed(units.problem)
    _warn_unseen(procfs, snap.denied_pids, any(not x.processes for x in listeners))
    _warn_namespaces(spaces)
    if args.json:
        print_json([listener_json(x, ephemeral=x.socket.inode in clients) for x in listeners])
    elif listeners or args.command == "list":
        users = {x.socket.uid: procfs.user_name(x.socket.uid) for x in listeners}
        headers = LISTENER_HEADERS_NETNS if spaces is not None else LISTENER_HEADERS
        print_table(headers, listener_rows(listeners, users, netns=spaces is not None))
    if unread:
        return _incomplete(unread)
    if args.command == "who" and not listeners:
        proto = "udp" if args.udp else "tcp"
        sys.stderr.write(f"portwatch: nothing listens on {proto} port {args.port}\n")
        return ExitStatus.NOT_FOUND
    return ExitStatus.OK


def _ephemeral(procfs: ProcFS, listeners: list[Listener]) -> set[int]:
    """The inodes of the ephemeral UDP client sockets among `listeners`."""
    if not any(x.socket.proto is Proto.UDP for x in listeners):
        return set()
    from portwatch import ephemeral  # noqa: PLC0415 (only UDP listings need it)

    clients, problem = ephemeral.clients_here(listeners, procfs.root)
    if problem is not None:
        sys.stderr.write(f"portwatch: ephemeral UDP sockets not told apart ({problem})\n")
    return clients


def _say_hidden(count: int, why: str) -> None:
    sys.stderr.write(f"portwatch: {count} ephemeral UDP client socket{'s' * (count > 1)} not shown ({why})\n")


def _reserving(path: str | None) -> Callable[[Proto, int], bool] | None:
    """Whether a rule of the config (--config, else /etc/portwatch.yaml when it exists) names a
    port, which `list` then never hides; None when it is invalid (said on stderr): nothing is
    hidden. Without a config file the YAML stack is not even imported."""
    if path is None and not os.path.exists(DEFAULT_CONFIG):  # noqa: PTH110
        return lambda _proto, _port: False
    config = _load(path)
    if config is None:
        sys.stderr.write("portwatch: no ephemeral UDP socket hidden: which ports are reserved is unknown\n")
        return None
    return config.names


def _host_listeners(procfs: ProcFS, lister: SocketLister, protocols: tuple[Proto, ...],
                    port: int | None = None) -> tuple[list[Listener], list[str]]:
    """portwatch's own namespace's listeners (on `port`), socket units named; what could not be
    read is said."""
    snap, unread = full_scan(procfs, lister, protocols, (4, 6))
    if port is not None:  # before the socket units: only these are asked about
        snap = snap._replace(listeners={i: x for i, x in snap.listeners.items() if x.socket.port == port})
    units = UnitCache(socket_units)
    listeners = units.apply(snap).sorted()
    _warn_fallback(lister)
    _warn_unattributed(units.problem)
    _warn_unseen(procfs, snap.denied_pids, any(not x.processes for x in listeners))
    return listeners, unread


def _load(path: str | None) -> Config | None:
    """The config, or None when it is invalid (said on stderr, one line per problem)."""
    loaded = _load_text(path or DEFAULT_CONFIG)
    return loaded[0] if loaded is not None else None


def _load_text(path: str) -> tuple[Config, str] | None:
    """The config and the text it was read from (one read), or None as for `_load`."""
    from portwatch.config import ConfigError, parse_config, read_config  # noqa: PLC0415 (the YAML stack)

    try:
        data = read_config(path)
        return parse_config(data, path), data.decode("utf-8", "surrogateescape")
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return None


def _baseline(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister) -> int:
    """A config reserving the chosen listeners' ports for their owners, or the new ones added to --config."""
    from portwatch import baseline  # noqa: PLC0415 (this command only)
    from portwatch.config import ConfigError, parse_config  # noqa: PLC0415

    loaded = _load_text(args.config) if args.config else None
    if args.config and loaded is None:
        return ExitStatus.CONFIG_ERROR
    existing, old_text = loaded if loaded is not None else (None, None)
    listeners, unread = _host_listeners(procfs, lister, (Proto.TCP, Proto.UDP))
    chosen, left_out = _chosen(args, listeners, _ephemeral(procfs, listeners), existing)
    made = baseline.build(
        chosen, taken_names=[r.name for r in existing.reserved] if existing else (),
        covered=(lambda proto, port: existing.rule_for(proto, port) is not None) if existing else None,
    )
    skipped = [*left_out, *made.skipped]
    try:
        text = _baseline_text(old_text, made, skipped)
        parse_config(text, args.output or "<baseline>")
    except baseline.MergeError as exc:
        sys.stderr.write(f"portwatch: cannot add rules to {escape(args.config)}: {exc}\n")
        return ExitStatus.CONFIG_ERROR
    except ConfigError as exc:  # a bug: never hand out a config the daemon would refuse
        sys.stderr.write(f"portwatch: the config made is invalid, not written: {exc.problems[0]}\n")
        return ExitStatus.SOFTWARE
    verb = "added" if existing is not None else "reserved"
    for rule in (new.rule for new in made.rules):
        sys.stderr.write(escape(f"portwatch: {verb} rule {rule.name}: {rule.proto} "
                                f"{', '.join(map(str, rule.ports))}") + "\n")
    for line in skipped:
        sys.stderr.write(f"portwatch: {escape(line)}\n")
    if not made.rules:
        sys.stderr.write(f"portwatch: nothing to add: {escape(args.config)} reserves every chosen port\n"
                         if existing is not None else "portwatch: no port chosen could be reserved\n")
    if args.output:
        _write_atomically(args.output, text)
    else:
        sys.stdout.write(text)
    return _incomplete(unread) if unread else ExitStatus.OK


def _chosen(args: argparse.Namespace, listeners: list[Listener], clients: set[int], existing: Config | None
            ) -> tuple[list[Listener], list[str]]:
    """The listeners `baseline` makes rules for, and why chosen ones were left out (for the file).
    The ports the default leaves out are counted on stderr."""
    from portwatch.baseline import wanted  # noqa: PLC0415

    chosen = [x for x in listeners if wanted(x, args.ports, args.all)
              and (x.socket.inode not in clients or args.ports is not None)]
    taken = {(x.socket.proto, x.socket.port) for x in chosen}
    others = {(x.socket.proto, x.socket.port) for x in listeners if x.socket.inode not in clients} - taken
    if others and args.ports is None and not args.all:
        sys.stderr.write(f"portwatch: {len(others)} other port{'s' * (len(others) > 1)} (1024 and above, "
                         "held outside systemd services) left out: --all or --ports takes them\n")
    unnamed = {x.socket.port for x in listeners if x.socket.inode in clients} - {port for _, port in taken}
    if unnamed:
        sys.stderr.write(f"portwatch: {len(unnamed)} UDP socket{'s' * (len(unnamed) > 1)} on the kernel's "
                         "client ports (ip_local_port_range) left out as clients'; --ports takes a "
                         "server's\n")
    left_out: list[str] = []
    if existing is not None:
        for proto in sorted({x.socket.proto for x in chosen} - existing.protocols):
            ports = sorted({x.socket.port for x in chosen if x.socket.proto is proto})
            left_out.append(f"{proto} ports {', '.join(map(str, ports))}: protocols in {args.config} "
                            f"does not include {proto}; not reserved")
        chosen = [x for x in chosen if x.socket.proto in existing.protocols]
    return chosen, left_out


def _baseline_text(old_text: str | None, made: Baseline, skipped: list[str]) -> str:
    """The whole config made, or --config's text with the new rules added (MergeError)."""
    from datetime import UTC, datetime  # noqa: PLC0415 (this command only)

    from portwatch.baseline import config_text, merge  # noqa: PLC0415

    if old_text is not None:
        return merge(old_text, made.rules, skipped)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return config_text(made, host=os.uname().nodename, when=when)


def _write_atomically(path: str, text: str) -> None:
    """Replace `path` (the file a symbolic link names) with `text` in one rename; its mode is kept
    (0644 for a new file)."""
    from pathlib import Path  # noqa: PLC0415

    from portwatch.atomicfile import replace_file  # noqa: PLC0415

    target = Path(path).resolve()
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    replace_file(target, text.encode("utf-8", "surrogateescape"), mode, durable=True)


def _explain(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister) -> int:
    """Each listener's rule, holders and verdict under the config, as the daemon would judge."""
    from portwatch import explain  # noqa: PLC0415 (this command only)

    config = _load(args.config)
    if config is None:
        return ExitStatus.CONFIG_ERROR
    if args.port is not None:
        protocols: tuple[Proto, ...] = (Proto.UDP,) if args.udp else (Proto.TCP,)
    else:
        protocols = tuple(sorted(config.protocols))
    unwatched = sorted(set(protocols) - config.protocols)
    if unwatched:
        sys.stderr.write(f"portwatch: {', '.join(unwatched)} is not in the config's protocols: the daemon "
                         "does not watch it, and would judge none of these\n")
    elsewhere = sorted({rule.netns for rule in config.reserved if rule.netns not in (None, "host")})
    if elsewhere and config.netns == "all":
        names = ", ".join(map(escape, elsewhere))
        sys.stderr.write(f"portwatch: rules for other network namespaces ({names}) are not judged here: "
                         "explain reads portwatch's own namespace only\n")
    listeners, unread = _host_listeners(procfs, lister, protocols, args.port)
    clients = _ephemeral(procfs, listeners)
    hidden = [x for x in listeners
              if x.socket.inode in clients and not config.names(x.socket.proto, x.socket.port)]
    if hidden and args.port is None:
        listeners = [x for x in listeners if x not in hidden]
        _say_hidden(len(hidden), "no rule reserves their ports")
    found = [explain.explain(x, config.rule_for(x.socket.proto, x.socket.port, x.netns)) for x in listeners]
    if args.json:
        print_json([explain.to_json(e, ephemeral=e.listener.socket.inode in clients) for e in found])
    elif found:
        print_table(explain.HEADERS, explain.rows(found))
    if args.port is not None and not found:
        sys.stderr.write(f"portwatch: nothing listens on {protocols[0]} port {args.port}\n")
    if unread:
        return _incomplete(unread)
    return ExitStatus.VIOLATION if any(e.violated for e in found) else ExitStatus.OK


def _why(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister) -> int:
    """Whether ADDR:PORT can be bound now: the overlapping listeners, then a real bind()."""
    from portwatch import bindcheck, why  # noqa: PLC0415 (only this command needs them)

    proto = Proto.UDP if args.udp else Proto.TCP
    listeners, unread = _host_listeners(procfs, lister, (proto,), args.port)
    try:
        v6only = sockdiag_v6only(proto)
    except SockDiagUnavailable as exc:
        v6only = {}
        sys.stderr.write(f"portwatch: IPV6_V6ONLY of IPv6 listeners unknown ({exc}); counted as dual-stack\n")
    wanted_v6only = bindcheck.system_v6only()
    found = why.blockers(listeners, proto, args.address, args.port, v6only=v6only,
                         wanted_v6only=wanted_v6only)
    failed = bindcheck.try_bind(proto, args.address, args.port, v6only=wanted_v6only)
    since = {b.listener.socket.inode: started for b in found if b.listener.processes
             and (started := bindcheck.process_started(b.listener.processes[0].pid, args.proc)) is not None}
    can, text = why.explain(proto, args.address, args.port, found, bind_failed=failed, uid=os.geteuid(),
                            since={inode: f"{when} (process start)" for inode, when in since.items()})
    if args.json:
        print_json({
            "proto": proto.value, "address": args.address, "port": args.port, "would_bind": can,
            "bind_error": None if failed is None else failed.strerror, "explanation": text,
            "blockers": [{**listener_json(b.listener), "reason": b.reason,
                          "process_started": since.get(b.listener.socket.inode)} for b in found],
        })
    else:
        sys.stdout.write(escape(text) + "\n")
    if unread and can:
        return _incomplete(unread)
    return ExitStatus.OK if can else ExitStatus.BLOCKED


def _ps(args: argparse.Namespace, procfs: ProcFS, lister: SocketLister) -> int:
    spaces = _namespaces(args, procfs, lister)
    netns_of: dict[int, NetNs] = {}
    if spaces is not None:
        listing = spaces.listing_all((Proto.TCP, Proto.UDP), (4, 6))
        table_read, netns_of = listing.table, listing.netns_of
        wanted = _in_netns(args, spaces)
        if wanted is not None:
            table_read.sockets = [s for s in table_read.sockets if wanted(netns_of.get(s.inode, spaces.host))]
    else:
        table_read = lister.list((Proto.TCP, Proto.UDP), (4, 6))
    by_inode = {s.inode: s for s in table_read.sockets if s.inode}
    entries: list[ProcessPorts] = []
    denied = 0
    for pid in sorted(procfs.pids()):
        info = procfs.process(pid)
        if info is None:
            continue
        entry = ProcessPorts(info)
        try:
            fds = procfs.socket_fds(pid)
        except ProcessGone:
            continue
        except AccessDenied:
            entry.fds_readable = False
            denied += 1
        else:
            held = {inode for inode in fds.values() if inode in by_inode}
            entry.sockets = sorted((by_inode[i] for i in held), key=lambda s: (s.proto, s.port))
        entries.append(entry)
    problem = _attribute_socket_units(entries)
    _warn_fallback(lister)
    _warn_unattributed(problem)
    _warn_unseen(procfs, denied, True)
    _warn_namespaces(spaces)
    if args.json:
        host = spaces.host if spaces is not None else own_netns(procfs)
        print_json([process_ports_json(e, netns_of, host) for e in entries])
    else:
        print_table(PROCESS_HEADERS, process_rows(entries, netns_of))
    return _incomplete(table_read.errors) if table_read.errors else ExitStatus.OK


def _attribute_socket_units(entries: list[ProcessPorts]) -> str | None:
    """Name the socket unit of each socket systemd holds; why they could not be had, or None."""
    held = [e for e in entries if e.sockets and is_manager(e.process)]
    if not held:
        return None
    try:
        units = socket_units()
    except Unavailable as exc:
        return str(exc)
    for entry in held:
        for sock in entry.sockets:
            if (activation := match(sock, units)) is not None:
                entry.socket_units[sock.inode] = activation
    return None


def _warn_unattributed(problem: str | None) -> None:
    if problem is not None:
        sys.stderr.write(
            f"portwatch: socket units could not be resolved ({problem}); "
            "sockets the service manager holds are shown as its own\n"
        )


def _warn_fallback(lister: SocketLister) -> None:
    if lister.fallback_reason:
        sys.stderr.write(f"portwatch: netlink unavailable ({lister.fallback_reason}); read /proc/net\n")


def _warn_unseen(procfs: ProcFS, denied: int, matters: bool) -> None:
    """One line saying why some owners are unknown, and what would fix it."""
    if denied and matters:
        what = "process" if denied == 1 else "processes"
        sys.stderr.write(
            f"portwatch: the owners of some sockets could not be identified ({denied} {what} could "
            f"not be inspected): {advice(procfs.own_capabilities(), os.geteuid())}\n"
        )


def _incomplete(unread: list[str]) -> int:
    """Name each socket table that could not be read: the answer above lacks its sockets."""
    for error in unread:
        sys.stderr.write(f"portwatch: cannot read {escape(error)}; the answer above lacks its sockets\n")
    return ExitStatus.DATA_ERROR
