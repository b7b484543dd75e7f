"""Config parsing and validation: every problem is one exact `PATH:LINE: message` line."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portwatch.config import (
    DEFAULT_PATH,
    Config,
    ConfigError,
    HookSpec,
    MetricsSettings,
    load_config,
    parse_config,
)
from portwatch.model import Proto
from portwatch.policy import Allow, PortRange, Rule
from portwatch.yamlread import StrictLoader
from tests.conftest import run_cli

P = "/cfg/pw.yaml"
EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "portwatch.yaml"
TOP_KEYS = (
    "interval, protocols, log_listeners, reserved, hooks, hook_cooldown, max_parallel_hooks, "
    "state_dir, follow_journal, conflict_hooks, netns, metrics, udp_ephemeral"
)


def problems(text: str | bytes) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, P)
    return info.value.problems


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), P)


# --- valid configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n", "null\n"])
def test_empty_document_gives_all_defaults(text: str) -> None:
    """An empty or comment-only file is valid and means every default."""
    config = parse_config(text, P)
    assert config == Config(path=P)
    assert config.interval == 1.0
    assert config.protocols == frozenset({Proto.TCP, Proto.UDP})
    assert config.log_listeners is True
    assert config.reserved == ()
    assert config.hooks == {}
    assert config.hook_cooldown == 60.0
    assert config.max_parallel_hooks == 4
    assert config.state_dir is None


def test_full_config_parses_into_values() -> None:
    """Every key of the documented format lands in the right field."""
    config = parse(
        """\
        interval: 2.5
        protocols: [tcp]
        log_listeners: false
        hook_cooldown: 0
        max_parallel_hooks: 2
        state_dir: /var/lib/portwatch
        reserved:
          - name: postgres
            ports: [5432, "6000-6010", 7000-7001]
            proto: tcp
            allow:
              - comm: postgres
              - exe: /usr/lib/postgresql/*/bin/postgres
                user: postgres
              - user: 0
              - unit: postgresql*.service
            hooks: [page-oncall]
          - name: nobody
            ports: [9]
            allow:
        hooks:
          page-oncall:
            command: ["/usr/local/bin/notify-oncall", "--severity", "high"]
            timeout: 3
          quiet:
            command: [/bin/true]
        """
    )
    postgres = Rule(
        name="postgres",
        ports=(PortRange(5432, 5432), PortRange(6000, 6010), PortRange(7000, 7001)),
        proto=Proto.TCP,
        allow=(
            Allow(comm="postgres"),
            Allow(exe="/usr/lib/postgresql/*/bin/postgres", user="postgres"),
            Allow(user="0"),
            Allow(unit="postgresql*.service"),
        ),
        hooks=("page-oncall",),
    )
    assert config == Config(
        path=P,
        interval=2.5,
        protocols=frozenset({Proto.TCP}),
        log_listeners=False,
        reserved=(postgres, Rule(name="nobody", ports=(PortRange(9, 9),))),
        hooks={
            "page-oncall": HookSpec(
                "page-oncall", ("/usr/local/bin/notify-oncall", "--severity", "high"), 3.0
            ),
            "quiet": HookSpec("quiet", ("/bin/true",), 10.0),
        },
        hook_cooldown=0.0,
        max_parallel_hooks=2,
        state_dir="/var/lib/portwatch",
    )
    assert isinstance(config.interval, float)
    assert isinstance(config.hooks["page-oncall"].timeout, float)


def test_metrics_settings_parse() -> None:
    both = parse_config('metrics:\n  listen: "[::1]:9948"\n  textfile: /var/lib/n/pw.prom\n', P).metrics
    assert both == MetricsSettings(listen=("::1", 9948), textfile="/var/lib/n/pw.prom")
    assert parse_config('metrics: {listen: "0.0.0.0:80"}\n', P).metrics == MetricsSettings(listen=("0.0.0.0", 80))
    assert parse_config("interval: 1\n", P).metrics is None


def test_null_sections_mean_empty_or_unset() -> None:
    """An admin who comments out every rule leaves `reserved:` empty, which is valid."""
    config = parse("reserved:\nhooks:\nstate_dir:\n")
    assert (config.reserved, config.hooks, config.state_dir) == ((), {}, None)


def test_rule_for_finds_the_one_rule_by_proto_and_port() -> None:
    """rule_for matches port ranges per protocol and returns None elsewhere."""
    config = parse(
        """\
        reserved:
          - {name: db, ports: [5432, "6000-6010"]}
          - {name: dns, ports: [53], proto: udp}
          - {name: dns-tcp, ports: [53]}
        """
    )
    assert config.rule_for(Proto.TCP, 6005) is config.reserved[0]
    assert config.rule_for(Proto.UDP, 53) is config.reserved[1]
    assert config.rule_for(Proto.TCP, 53) is config.reserved[2]
    assert config.rule_for(Proto.UDP, 5432) is None
    assert config.rule_for(Proto.TCP, 6011) is None


def test_config_is_frozen_hashable_and_comparable() -> None:
    """A reload compares configs with ==, and a Config can be hashed despite its dict."""
    text = "reserved: [{name: a, ports: [1]}]\nhooks: {h: {command: [/bin/true]}}\n"
    a, b = parse_config(text, P), parse_config(text, P)
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.interval = 2.0  # type: ignore[misc]


def test_example_config_loads() -> None:
    """etc/portwatch.yaml, the file admins start from, passes validation."""
    config = load_config(str(EXAMPLE))
    assert config.path == str(EXAMPLE)
    assert [r.name for r in config.reserved] == ["ssh", "postgres", "dns"]
    assert config.rule_for(Proto.UDP, 53) is not None
    shell, _, script = config.hooks["log-violation"].command
    assert shell == "/bin/sh" and script.startswith("exec /usr/bin/logger ")
    assert Path(shell).exists() and Path("/usr/bin/logger").exists()
    assert config.interval == 1.0
    assert config.log_listeners is True


@pytest.mark.root
def test_check_reads_etc_portwatch_yaml_unless_told_otherwise(tmp_path: Path) -> None:
    """`portwatch check` with no --config reads /etc/portwatch.yaml: put a bad one there, in a
    private mount namespace over an overlay of the host's /etc (which is left untouched)."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    overlay = (f'mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && '
               'printf "interval: 0\\n" > /etc/portwatch.yaml && exec "$@"')
    result = run_cli("check", prefix=["unshare", "--mount", "sh", "-c", overlay, "sh"])
    assert (result.returncode, result.stderr) == (78, f"{DEFAULT_PATH}:1: interval: must be > 0, got 0\n")


# --- YAML 1.1 surprises ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "value"),
    [
        ("on", "on"),
        ("off", "off"),
        ("yes", "yes"),
        ("NO", "NO"),
        ("True", "True"),
        ("22:22", "22:22"),
        ("0755", "0755"),
        ("0x1F", "0x1F"),
        ("1_000", "1_000"),
        ("2024-01-01", "2024-01-01"),
        (".inf", ".inf"),
        ("true", True),
        ("false", False),
        ("8080", 8080),
        ("-3", -3),
        ("0", 0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("~", None),
        ("null", None),
    ],
)
def test_strict_loader_resolves_like_yaml_1_2(scalar: str, value: object) -> None:
    """Only true/false, decimal ints and plain floats are typed; the rest stays a string."""
    import yaml

    loaded = yaml.load(f"v: {scalar}\n", Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    assert loaded == {"v": value}
    assert type(loaded["v"]) is type(value)


# --- one exact message per error -------------------------------------------------------------

ERRORS: list[tuple[str, str, list[str]]] = [
    # (case id, YAML text, expected problems)
    (
        "unknown-top-level-key",
        "intervl: 1\n",
        [
            f"{P}:1: unknown top-level key 'intervl' (did you mean 'interval'?); "
            f"expected one of: {TOP_KEYS}"
        ],
    ),
    (
        "duplicate-top-level-key",
        "interval: 5\nlog_listeners: true\ninterval: 10\n",
        [f"{P}:3: duplicate key 'interval' (first at line 1)"],
    ),
    (
        "duplicate-nested-key",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - comm: x\n        comm: y\n",
        [f"{P}:6: reserved[0].allow[0]: duplicate key 'comm' (first at line 5)"],
    ),
    (
        "yaml11-bool",
        "log_listeners: on\n",
        [
            f"{P}:1: log_listeners: must be true or false, not the string 'on' "
            "(YAML 1.1 booleans are not accepted)"
        ],
    ),
    (
        "sexagesimal",
        "interval: 22:22\n",
        [f"{P}:1: interval: must be a number, not the string '22:22'"],
    ),
    ("octal", "interval: 0755\n", [f"{P}:1: interval: must be a number, not the string '0755'"]),
    (
        "date",
        "hook_cooldown: 2024-01-01\n",
        [f"{P}:1: hook_cooldown: must be a number, not the string '2024-01-01'"],
    ),
    ("interval-zero", "interval: 0\n", [f"{P}:1: interval: must be > 0, got 0"]),
    ("interval-negative", "interval: -0.5\n", [f"{P}:1: interval: must be > 0, got -0.5"]),
    (
        "interval-null",
        "interval:\n",
        [f"{P}:1: interval: must be a number, not null (an empty value)"],
    ),
    (
        "interval-bool",
        "interval: true\n",
        [f"{P}:1: interval: must be a number, not the boolean true"],
    ),
    (
        "interval-huge",
        "interval: 1e10\n",
        [f"{P}:1: interval: must be at most 1000000000, got 1e10"],
    ),
    (
        "interval-infinite",
        "interval: 1e999\n",
        [f"{P}:1: interval: must be a finite number, got 1e999"],
    ),
    ("cooldown-negative", "hook_cooldown: -1\n", [f"{P}:1: hook_cooldown: must be >= 0, got -1"]),
    (
        "parallel-zero",
        "max_parallel_hooks: 0\n",
        [f"{P}:1: max_parallel_hooks: must be between 1 and 1024, got 0"],
    ),
    (
        "parallel-float",
        "max_parallel_hooks: 2.0\n",
        [f"{P}:1: max_parallel_hooks: must be an integer >= 1, not the number 2.0"],
    ),
    (
        "state-dir-relative",
        "state_dir: var/lib\n",
        [f"{P}:1: state_dir: must be an absolute directory path, not 'var/lib'"],
    ),
    (
        "state-dir-list",
        "state_dir: [/a]\n",
        [f"{P}:1: state_dir: must be an absolute directory path, not a list"],
    ),
    (
        "protocols-unknown",
        "protocols: [tcp, sctp]\n",
        [f"{P}:1: protocols[1]: unknown protocol 'sctp'; expected tcp or udp"],
    ),
    (
        "protocols-empty",
        "protocols: []\n",
        [f"{P}:1: protocols: must list at least one of tcp, udp"],
    ),
    ("protocols-twice", "protocols: [udp, udp]\n", [f"{P}:1: protocols[1]: udp is listed twice"]),
    (
        "protocols-string",
        "protocols: tcp\n",
        [f"{P}:1: protocols: must be a list of protocols, e.g. [tcp, udp], not the string 'tcp'"],
    ),
    (
        "top-level-list",
        "- interval: 1\n",
        [f"{P}:1: the top level must be a mapping, not a list"],
    ),
    (
        "top-level-string",
        "just some words\n",
        [f"{P}:1: the top level must be a mapping, not the string 'just some words'"],
    ),
    (
        "syntax-error",
        "interval: 1\nreserved: [\n",
        [
            f"{P}:3: YAML syntax error: while parsing a flow node; expected the node content, "
            "but found '<stream end>' (column 1)"
        ],
    ),
    (
        "syntax-error-indent",
        "interval: 1\n  protocols: [tcp]\n",
        [f"{P}:2: YAML syntax error: mapping values are not allowed here (column 12)"],
    ),
    (
        "two-documents",
        "interval: 1\n---\ninterval: 2\n",
        [
            f"{P}:2: YAML syntax error: expected a single document in the stream; "
            "but found another document (column 1)"
        ],
    ),
    (
        "control-character",
        "interval: 1\nx: \x07\n",
        [f"{P}:2: character U+0007 is not allowed in YAML"],
    ),
    ("too-deep", "x: " + "[" * 1500, [f"{P}:1: YAML nesting is too deep"]),
    (
        "python-tag",
        "interval: !!python/object/apply:os.system [id]\n",
        [
            f"{P}:1: interval: unsupported YAML tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'"
        ],
    ),
    ("custom-tag", "interval: !secs 5\n", [f"{P}:1: interval: unsupported YAML tag '!secs'"]),
    (
        "set-tag",
        "hooks: !!set {a}\n",
        [
            f"{P}:1: hooks: unsupported YAML tag 'tag:yaml.org,2002:set'",
            f"{P}:1: hooks.a: must be a mapping with command, not null (an empty value)",
        ],
    ),
    (
        "bad-explicit-int",
        'interval: !!int "0x10"\n',
        [f"{P}:1: interval: '0x10' is not a valid !!int"],
    ),
    ("merge-key", "<<: {interval: 2}\n", [f"{P}:1: merge keys ('<<') are not supported"]),
    (
        "non-string-key",
        "1: 2\n",
        [f"{P}:1: a key must be a string, not the integer 1"],
    ),
    # reserved rules
    (
        "reserved-not-list",
        "reserved: {name: a}\n",
        [f"{P}:1: reserved: must be a list of rules, not a mapping"],
    ),
    (
        "rule-not-mapping",
        "reserved: [ssh]\n",
        [f"{P}:1: reserved[0]: must be a mapping (a rule), not the string 'ssh'"],
    ),
    (
        "rule-missing-keys",
        "reserved:\n  - proto: tcp\n",
        [
            f"{P}:2: reserved[0]: missing required key 'name'",
            f"{P}:2: reserved[0]: missing required key 'ports'",
        ],
    ),
    (
        "rule-unknown-key",
        "reserved:\n  - name: a\n    ports: [1]\n    alow: []\n",
        [
            f"{P}:4: reserved[0]: unknown key 'alow' (did you mean 'allow'?); "
            "expected one of: name, ports, proto, allow, hooks, netns"
        ],
    ),
    (
        "port-out-of-range",
        'reserved:\n  - name: a\n    ports: [1, "2", 70000]\n',
        [f"{P}:3: reserved[0].ports[2]: port 70000 is outside 1-65535"],
    ),
    (
        "port-zero",
        "reserved:\n  - name: a\n    ports: [0]\n",
        [f"{P}:3: reserved[0].ports[0]: port 0 is outside 1-65535"],
    ),
    (
        "port-negative",
        "reserved:\n  - name: a\n    ports: [-22]\n",
        [f"{P}:3: reserved[0].ports[0]: port -22 is outside 1-65535"],
    ),
    (
        "port-string-out-of-range",
        'reserved:\n  - name: a\n    ports: ["99999999999999999999"]\n',
        [f"{P}:3: reserved[0].ports[0]: port 99999999999999999999 is outside 1-65535"],
    ),
    (
        "range-out-of-range",
        "reserved:\n  - name: a\n    ports: [65000-70000]\n",
        [f"{P}:3: reserved[0].ports[0]: range 65000-70000 is outside 1-65535"],
    ),
    (
        "range-reversed",
        'reserved:\n  - name: a\n    ports: ["6010-6000"]\n',
        [f"{P}:3: reserved[0].ports[0]: range 6010-6000 is reversed (write 6000-6010)"],
    ),
    (
        "port-base60",
        "reserved:\n  - name: a\n    ports: [22:22]\n",
        [
            f"{P}:3: reserved[0].ports[0]: invalid port '22:22'; "
            'expected a port (5432) or a range ("6000-6010")'
        ],
    ),
    (
        "port-octal",
        "reserved:\n  - name: a\n    ports: [0755]\n",
        [f"{P}:3: reserved[0].ports[0]: invalid port '0755': no leading zeros"],
    ),
    (
        "port-float",
        "reserved:\n  - name: a\n    ports: [22.0]\n",
        [
            f"{P}:3: reserved[0].ports[0]: must be a port (5432) or a range "
            '("6000-6010"), not the number 22.0'
        ],
    ),
    (
        "port-name",
        "reserved:\n  - name: a\n    ports: [ssh]\n",
        [
            f"{P}:3: reserved[0].ports[0]: invalid port 'ssh'; "
            'expected a port (5432) or a range ("6000-6010")'
        ],
    ),
    (
        "ports-empty",
        "reserved:\n  - name: a\n    ports: []\n",
        [f"{P}:3: reserved[0].ports: must list at least one port"],
    ),
    (
        "ports-scalar",
        "reserved:\n  - name: a\n    ports: 22\n",
        [
            f"{P}:3: reserved[0].ports: must be a list of ports, "
            'e.g. [5432, "6000-6010"], not the integer 22'
        ],
    ),
    (
        "proto-unknown",
        "reserved:\n  - name: a\n    ports: [1]\n    proto: sctp\n",
        [f"{P}:4: reserved[0].proto: unknown protocol 'sctp'; expected tcp or udp"],
    ),
    (
        "proto-not-watched",
        "protocols: [tcp]\nreserved:\n  - name: a\n    ports: [53]\n    proto: udp\n",
        [f"{P}:5: reserved[0].proto: udp is not in protocols, so this rule would never be checked"],
    ),
    (
        "rule-name-duplicate",
        "reserved:\n  - name: a\n    ports: [1]\n  - name: a\n    ports: [2]\n",
        [f"{P}:4: reserved[1].name: duplicate rule name 'a' (first at line 2)"],
    ),
    (
        "rule-name-invalid",
        "reserved:\n  - name: my rule\n    ports: [1]\n",
        [
            f"{P}:2: reserved[0].name: invalid rule name 'my rule': use 1-64 letters, digits, "
            "'.', '_', '-', '@' or ':', starting with a letter or digit"
        ],
    ),
    (
        "rule-name-empty",
        "reserved:\n  - name: ''\n    ports: [1]\n",
        [f"{P}:2: reserved[0].name: must be a non-empty string, not empty"],
    ),
    (
        "overlap-between-rules",
        "reserved:\n  - name: pg\n    ports: [5432]\n  - name: other\n    ports: [22, 5000-6000]\n",
        [
            f"{P}:5: reserved[1].ports[1]: tcp port 5432 is already reserved by rule 'pg' "
            "(reserved[0].ports[0], line 3); a port may belong to one rule only"
        ],
    ),
    (
        "overlap-ranges",
        "reserved:\n  - name: a\n    ports: [1-100]\n  - name: b\n    ports: [90-200]\n",
        [
            f"{P}:5: reserved[1].ports[0]: tcp ports 90-100 are already reserved by rule 'a' "
            "(reserved[0].ports[0], line 3); a port may belong to one rule only"
        ],
    ),
    (
        "overlap-within-rule",
        "reserved:\n  - name: a\n    ports: [22, 22]\n",
        [
            f"{P}:3: reserved[0].ports[1]: tcp port 22 is already listed in this rule "
            "(reserved[0].ports[0], line 3); a port may belong to one rule only"
        ],
    ),
    (
        "overlap-udp",
        "reserved:\n  - {name: a, ports: [53], proto: udp}\n"
        "  - {name: b, ports: [53], proto: udp}\n",
        [
            f"{P}:3: reserved[1].ports[0]: udp port 53 is already reserved by rule 'a' "
            "(reserved[0].ports[0], line 2); a port may belong to one rule only"
        ],
    ),
    # allow entries
    (
        "allow-empty-entry",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - {}\n",
        [
            f"{P}:5: reserved[0].allow[0]: an allow entry needs at least one of "
            "comm, exe, user, unit"
        ],
    ),
    (
        "allow-string-entry",
        "reserved:\n  - name: a\n    ports: [1]\n    allow: [sshd]\n",
        [
            f"{P}:4: reserved[0].allow[0]: must be a mapping with comm, exe, user or unit, "
            "not the string 'sshd'"
        ],
    ),
    (
        "allow-unknown-key",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - pid: 1\n",
        [f"{P}:5: reserved[0].allow[0]: unknown key 'pid'; expected one of: comm, exe, user, unit"],
    ),
    (
        "allow-empty-value",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - exe: ''\n",
        [f"{P}:5: reserved[0].allow[0].exe: must be a non-empty string, not empty"],
    ),
    (
        "allow-list-value",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - comm: [a, b]\n",
        [f"{P}:5: reserved[0].allow[0].comm: must be a non-empty string, not a list"],
    ),
    (
        "allow-long-comm",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - comm: systemd-resolved\n",
        [
            f"{P}:5: reserved[0].allow[0].comm: 'systemd-resolved' can never match: the kernel "
            "truncates comm to 15 bytes (use 'systemd-resolve', exe or unit)"
        ],
    ),
    (
        "allow-negative-uid",
        "reserved:\n  - name: a\n    ports: [1]\n    allow:\n      - user: -1\n",
        [f"{P}:5: reserved[0].allow[0].user: must be a non-empty string, not the integer -1"],
    ),
    # hooks
    (
        "hook-shell-string",
        'hooks:\n  page:\n    command: "/bin/foo --x"\n',
        [f"{P}:3: hooks.page.command: must be a list of strings (argv), not a shell string"],
    ),
    (
        "hook-empty-argv",
        "hooks:\n  page:\n    command: []\n",
        [f"{P}:3: hooks.page.command: must not be empty: argv[0] is the program to run"],
    ),
    (
        "hook-empty-program",
        'hooks:\n  page:\n    command: ["", x]\n',
        [f"{P}:3: hooks.page.command[0]: the program must not be empty"],
    ),
    (
        "hook-int-argument",
        "hooks:\n  page:\n    command: [/bin/sleep, 3]\n",
        [f"{P}:3: hooks.page.command[1]: must be a string (quote it), not the integer 3"],
    ),
    (
        "hook-nul-argument",
        'hooks:\n  page:\n    command: [/bin/echo, "a\\0b"]\n',
        [f"{P}:3: hooks.page.command[1]: must not contain a NUL character"],
    ),
    (
        "hook-missing-command",
        "hooks:\n  page:\n    timeout: 5\n",
        [f"{P}:3: hooks.page: missing required key 'command'"],
    ),
    (
        "hook-timeout-zero",
        "hooks:\n  page:\n    command: [/bin/true]\n    timeout: 0\n",
        [f"{P}:4: hooks.page.timeout: must be > 0, got 0"],
    ),
    (
        "hook-timeout-string",
        "hooks:\n  page:\n    command: [/bin/true]\n    timeout: 10s\n",
        [f"{P}:4: hooks.page.timeout: must be a number, not the string '10s'"],
    ),
    (
        "hook-unknown-key",
        "hooks:\n  page:\n    command: [/bin/true]\n    shell: true\n",
        [f"{P}:4: hooks.page: unknown key 'shell'; expected one of: command, timeout"],
    ),
    (
        "hook-not-mapping",
        "hooks:\n  page: /bin/true\n",
        [f"{P}:2: hooks.page: must be a mapping with command, not the string '/bin/true'"],
    ),
    (
        "hooks-list",
        "hooks:\n  - page\n",
        [f"{P}:2: hooks: must be a mapping of hook name to {{command, timeout}}, not a list"],
    ),
    (
        "hook-name-with-dot-is-quoted-in-path",
        'hooks:\n  log.v2:\n    command: "logger x"\n',
        [f"{P}:3: hooks['log.v2'].command: must be a list of strings (argv), not a shell string"],
    ),
    (
        "hook-name-invalid",
        "hooks:\n  'page me':\n    command: [/bin/true]\n",
        [
            f"{P}:2: hooks: invalid hook name 'page me': use 1-64 letters, digits, '.', '_', "
            "'-', '@' or ':', starting with a letter or digit"
        ],
    ),
    (
        "hook-undefined",
        "reserved:\n  - name: a\n    ports: [1]\n    hooks: [page-oncal]\n"
        "hooks:\n  page-oncall:\n    command: [/bin/true]\n",
        [
            f"{P}:4: reserved[0].hooks[0]: hook 'page-oncal' is not defined under hooks "
            "(did you mean 'page-oncall'?)"
        ],
    ),
    (
        "hook-undefined-no-hooks",
        "reserved:\n  - name: a\n    ports: [1]\n    hooks: [page]\n",
        [f"{P}:4: reserved[0].hooks[0]: hook 'page' is not defined under hooks"],
    ),
    (
        "hook-listed-twice",
        "reserved:\n  - name: a\n    ports: [1]\n    hooks: [h, h]\n"
        "hooks: {h: {command: [/bin/true]}}\n",
        [f"{P}:4: reserved[0].hooks[1]: hook 'h' is listed twice"],
    ),
    (
        "metrics-empty",
        "metrics: {}\n",
        [f"{P}:1: metrics: needs listen (an address:port to serve) or textfile (a path)"],
    ),
    (
        "metrics-host-name",
        "metrics:\n  listen: localhost:9948\n",
        [f"{P}:2: metrics.listen: 'localhost' is not an IPv4 address; expected an IP address and a port, "
         'e.g. "127.0.0.1:9948" or "[::1]:9948"'],
    ),
    (
        "metrics-ipv6-without-brackets",
        'metrics:\n  listen: "::1:9948"\n',
        [f'{P}:2: metrics.listen: an IPv6 address goes in brackets ("[::1]:9948"), not \'::1:9948\''],
    ),
    (
        "metrics-port-zero-and-textfile-relative",
        'metrics:\n  listen: "127.0.0.1:0"\n  textfile: portwatch.prom\n',
        [f'{P}:2: metrics.listen: must be an IP address and a port, e.g. "127.0.0.1:9948" or "[::1]:9948", '
         "not '127.0.0.1:0'"],
    ),
    (
        "metrics-textfile-not-prom",
        "metrics:\n  textfile: /var/lib/node/portwatch.txt\n",
        [f"{P}:2: metrics.textfile: must be an absolute path ending in .prom (node_exporter reads only "
         "those), not '/var/lib/node/portwatch.txt'"],
    ),
    (
        "metrics-not-a-mapping",
        'metrics: "127.0.0.1:9948"\n',
        [f"{P}:1: metrics: must be a mapping with listen or textfile, not the string '127.0.0.1:9948'"],
    ),
    (
        "hostile-value-is-escaped",
        'interval: "a\\nb\\e[31m\\u202e"\n',
        [f"{P}:1: interval: must be a number, not the string 'a\\nb\\x1b[31m\\u202e'"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_error_message(text: str, expected: list[str]) -> None:
    """Each kind of mistake gives exactly these lines, with file path and line number."""
    assert problems(text) == expected


def test_invalid_utf8_names_the_line() -> None:
    """A binary or non-UTF-8 file is one clear line, not a traceback."""
    assert problems(b"interval: 1\nprotocols: [tcp]\n\xff\xfe\x00garbage") == [
        f"{P}:3: not a UTF-8 text file (byte 0xff)"
    ]


def test_utf8_bom_is_accepted() -> None:
    """Editors that write a byte-order mark still produce a valid config."""
    assert parse_config(b"\xef\xbb\xbfinterval: 3\n", P).interval == 3.0


def test_all_problems_are_collected_in_file_order() -> None:
    """One pass reports every problem, sorted by line, so an admin fixes all at once."""
    text = textwrap.dedent(
        """\
        interval: 0
        protocols: [tcp]
        log_listeners: yes
        reserved:
          - name: web
            ports: [80, 70000]
            allow:
              - {}
            hooks: [nope]
          - name: web
            ports: [80]
            proto: udp
        hooks:
          page:
            command: "/bin/page --now"
        bogus: 1
        interval: 2
        """
    )
    assert problems(text) == [
        f"{P}:1: interval: must be > 0, got 0",
        f"{P}:3: log_listeners: must be true or false, not the string 'yes' "
        "(YAML 1.1 booleans are not accepted)",
        f"{P}:6: reserved[0].ports[1]: port 70000 is outside 1-65535",
        f"{P}:8: reserved[0].allow[0]: an allow entry needs at least one of comm, exe, user, unit",
        f"{P}:9: reserved[0].hooks[0]: hook 'nope' is not defined under hooks",
        f"{P}:10: reserved[1].name: duplicate rule name 'web' (first at line 5)",
        f"{P}:12: reserved[1].proto: udp is not in protocols, so this rule would never be checked",
        f"{P}:15: hooks.page.command: must be a list of strings (argv), not a shell string",
        f"{P}:16: unknown top-level key 'bogus'; expected one of: {TOP_KEYS}",
        f"{P}:17: duplicate key 'interval' (first at line 1)",
    ]


def test_str_of_error_is_the_joined_problems() -> None:
    """str(ConfigError) is the problems, one per line, ready to print."""
    with pytest.raises(ConfigError) as info:
        parse_config("interval: 0\nmax_parallel_hooks: 0\n", P)
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 2


def test_path_with_control_characters_cannot_break_the_line() -> None:
    """A file name with a newline is escaped, so each problem stays one line."""
    with pytest.raises(ConfigError) as info:
        parse_config("interval: 0\n", "/tmp/evil\nname.yaml")
    assert info.value.problems == ["/tmp/evil\\nname.yaml:1: interval: must be > 0, got 0"]


def test_alias_loops_do_not_hang() -> None:
    """Self-referencing anchors are rejected by type, without recursing forever."""
    assert problems("reserved: &r [*r]\n") == [
        f"{P}:1: reserved[0]: must be a mapping (a rule), not a list"
    ]


def test_anchors_and_aliases_work_for_shared_values() -> None:
    """An allow list can be written once and reused through a YAML alias."""
    config = parse(
        """\
        reserved:
          - name: a
            ports: [1]
            allow: &owners
              - user: postgres
          - name: b
            ports: [2]
            allow: *owners
        """
    )
    assert config.reserved[0].allow == config.reserved[1].allow == (Allow(user="postgres"),)


# --- load_config -----------------------------------------------------------------------------


def test_load_config_reads_a_real_file(tmp_path: Path) -> None:
    """load_config reads the file and keeps its path in the Config."""
    path = tmp_path / "pw.yaml"
    path.write_text("interval: 0.5\n")
    config = load_config(str(path))
    assert config.interval == 0.5
    assert config.path == str(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is one 'cannot read' line with the OS reason."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_load_config_directory(tmp_path: Path) -> None:
    """A directory given as the config file is refused with the OS reason."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_load_config_path_through_a_file(tmp_path: Path) -> None:
    """A path whose parent is a regular file fails even for root (ENOTDIR)."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "pw.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}: cannot read: Not a directory"]


def test_load_config_binary_file(tmp_path: Path) -> None:
    """A binary file read from disk gets the UTF-8 problem with its line."""
    path = tmp_path / "pw.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\n\x80\x81")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}:2: not a UTF-8 text file (byte 0x80)"]


def test_load_config_refuses_endless_input() -> None:
    """A device that never ends (/dev/zero) is refused instead of read forever."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert info.value.problems == ["/dev/zero: cannot read: larger than 1048576 bytes"]


def test_load_config_reports_yaml_errors_with_the_path(tmp_path: Path) -> None:
    """Validation problems from a real file carry that file's path."""
    path = tmp_path / "pw.yaml"
    path.write_text("reserved:\n  - name: a\n    ports: [70000]\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}:3: reserved[0].ports[0]: port 70000 is outside 1-65535"]


# --- properties ------------------------------------------------------------------------------

PROBLEM_LINE = re.compile(r"^/cfg/pw\.yaml:[1-9][0-9]*: [^\n]+$")


def assert_parses_or_reports(text: str | bytes) -> None:
    try:
        config = parse_config(text, P)
    except ConfigError as e:
        lines = e.problems
    else:
        assert isinstance(config, Config)
        return
    assert lines
    assert all(PROBLEM_LINE.match(line) for line in lines), lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_only_raises_config_error(text: str) -> None:
    """Any text either parses or gives one-line problems; nothing else is raised."""
    assert_parses_or_reports(text)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_arbitrary_bytes_only_raise_config_error(data: bytes) -> None:
    """Any bytes either parse or give one-line problems; nothing else is raised."""
    assert_parses_or_reports(data)


_WORDS = [
    "interval",
    "protocols",
    "log_listeners",
    "reserved",
    "hooks",
    "hook_cooldown",
    "max_parallel_hooks",
    "state_dir",
    "metrics",
    "listen",
    "textfile",
    "name",
    "ports",
    "proto",
    "allow",
    "comm",
    "exe",
    "user",
    "unit",
    "command",
    "timeout",
    "tcp",
    "udp",
    "h",
]
_SCALARS = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            22,
            70000,
            -1,
            1.5,
            True,
            None,
            "6000-6010",
            "6010-6000",
            "",
            "on",
            "22:22",
            "/bin/true",
            "h",
            "[",
            "a\nb",
            "systemd-resolved",
        ]
    ),
    st.integers(),
    st.text(max_size=4),
)
_TREES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_WORDS), inner, max_size=5)
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_WORDS), _TREES, max_size=8))
def test_config_shaped_documents_only_raise_config_error(document: dict[str, object]) -> None:
    """Documents built from the schema's own keys reach deep validation without crashing."""
    import yaml

    assert_parses_or_reports(yaml.safe_dump(document, default_flow_style=None))
