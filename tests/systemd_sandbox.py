"""A real systemd 252 booted as PID 1 of a private pid + mount namespace, for the unit tests.

PID 1 of the test machine need not be systemd. The namespace shares the host's network
and its file system, so everything systemd would write at boot is made
private first: tmpfs over /tmp, /var/tmp, /run, /var/log and /var/lib (the
units' StateDirectory= lives there), an overlay over /etc, and the units that would clean /tmp or
touch the host (tmpfiles, sysctl, modprobe, ldconfig, timers, postgres...)
are masked. systemd boots into a target of its own that wants only journald,
so nothing the host has enabled starts in the sandbox.

systemd gets a cgroup of its own (in the name=systemd and the unified
hierarchies) so its cgroup tree can be removed afterwards, and it is killed
with SIGKILL by the pid we started, which ends every process in its pid
namespace.

Files the sandbox's services read (a venv made from /usr/bin/python3 with the
project installed, configs, test programs) live in a fresh world-readable
directory /var/lib/portwatch-test-XXXX, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: readable by any user, unlike a venv under /root
SYSTEMD = "/lib/systemd/systemd"
BOOT_TIMEOUT = 30.0

# Units that would clean or write the host's files, change the host's kernel
# settings, or start services of the host's: masked in the sandbox. Units that
# do not exist here are harmless to mask.
MASKED = (
    "systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer "
    "systemd-tmpfiles-setup-dev.service systemd-logind.service getty.target console-getty.service "
    "systemd-networkd.service systemd-resolved.service systemd-timesyncd.service "
    "systemd-journald-audit.socket "
    "systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount "
    "proc-sys-fs-binfmt_misc.mount systemd-modules-load.service modprobe@.service "
    "kmod-static-nodes.service systemd-firstboot.service systemd-machine-id-commit.service "
    "systemd-random-seed.service systemd-journal-flush.service systemd-sysusers.service "
    "systemd-update-done.service ldconfig.service systemd-hwdb-update.service "
    "systemd-journal-catalog-update.service systemd-update-utmp.service "
    "systemd-update-utmp-runlevel.service systemd-pstore.service systemd-repart.service "
    "systemd-pcrphase-sysinit.service systemd-pcrphase.service systemd-remount-fs.service "
    "systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service "
    "dev-hugepages.mount dev-mqueue.mount sys-kernel-config.mount sys-kernel-debug.mount "
    "sys-kernel-tracing.mount sys-fs-fuse-connections.mount "
    "postgresql.service e2scrub_reap.service apt-daily.timer apt-daily-upgrade.timer "
    "dpkg-db-backup.timer e2scrub_all.timer fstrim.timer man-db.timer"
)

# Runs as PID 1 of the new namespaces (bash), then becomes systemd.
BOOT_SCRIPT = r"""
set -eu
for procs in $PW_CGROUP_PROCS; do echo $$ > "$procs"; done
mount --make-rprivate /
# systemd-tmpfiles would clean the host's /tmp: private mounts before anything runs.
for d in /tmp /var/tmp /run /var/log; do mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$d"; done
chmod 1777 /tmp /var/tmp
# StateDirectory= and /var/lib/systemd go to a tmpfs too; the work dir is carried over.
mkdir /run/pw-keep
mount --bind "$PW_WORK" /run/pw-keep
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /var/lib
mkdir -p "$PW_WORK"
mount --move /run/pw-keep "$PW_WORK"
rmdir /run/pw-keep
# /etc too: users the tests create (systemd-sysusers) go to a layer of the sandbox's own.
mkdir "$PW_WORK/etc-upper" "$PW_WORK/etc-work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$PW_WORK/etc-upper,workdir=$PW_WORK/etc-work" /etc
# What systemd-tmpfiles (masked here) does for journald on a real host: the journal's directory
# belongs to group systemd-journal, setgid, so the files journald makes there are readable by it.
mkdir -p /run/log/journal
chgrp systemd-journal /run/log/journal && chmod 2755 /run/log/journal
mkdir -p /run/systemd/system
for unit in $PW_MASKED; do ln -s /dev/null "/run/systemd/system/$unit"; done
cat > /run/systemd/system/portwatch-sandbox.target <<'EOF'
[Unit]
Description=portwatch test sandbox (journald only)
Wants=systemd-journald.service
After=systemd-journald.service
EOF
# Its own messages go to the sandbox's journal, not to the host's console.
exec /lib/systemd/systemd --system --unit=portwatch-sandbox.target --log-target=journal --log-level=notice
"""


class SandboxError(RuntimeError):
    """The sandbox could not be set up; the message says what happened."""


@dataclass
class Sandbox:
    """A booted systemd; `pid` is its pid in the host's pid namespace."""

    pid: int
    workdir: Path
    venv: Path
    log: Path
    _env: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside the sandbox (its mounts and pids)."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p"]

    def path(self, inside: str) -> Path:
        """A path inside the sandbox's mount namespace, reachable from the host."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.prefix, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env,
            check=False,
        )
        if check and done.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        """Entries matching journalctl `matches` (FIELD=value, -u UNIT, ...), as JSON objects."""
        out = self.run("journalctl", "--no-pager", "-o", "json", "--all", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_journal(self, *matches: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll until at least one entry matches; journald writes asynchronously."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.journal(*matches)
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.1)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def install_portwatch(self, unit: str = "portwatch.service") -> None:
        """The shipped unit, and its system user created as the README says (systemd-sysusers)."""
        shutil.copy2(ROOT / "systemd" / unit, self.path(f"/run/systemd/system/{unit}"))
        sysusers = self.path("/etc/sysusers.d/portwatch.conf")
        sysusers.parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / "systemd" / "portwatch.sysusers", sysusers)
        self.run("systemd-sysusers", "/etc/sysusers.d/portwatch.conf")


def field_bytes(entry: dict[str, Any], name: str) -> bytes | None:
    """A journal field's exact bytes: journalctl -o json gives non-UTF-8/control data as a list of ints."""
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, list):
        return bytes(value)
    return str(value).encode("utf-8")


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET", "JOURNAL_STREAM")
    }
    env.update({"SYSTEMD_PAGER": "", "PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"})
    return env


def install_venv(workdir: Path, env: dict[str, str]) -> Path:
    """A venv from the system Python with the project installed from a copy of the tree.

    The copy keeps pip's in-tree build (build/, *.egg-info) out of the checkout.
    """
    src = workdir / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    if (ROOT / "README.md").exists():
        shutil.copy2(ROOT / "README.md", src)
    shutil.copytree(ROOT / "portwatch", src / "portwatch", ignore=shutil.ignore_patterns("__pycache__"))
    venv = workdir / "venv"
    scratch = workdir / "pip-tmp"  # pip's build directories stay out of the host's /tmp
    scratch.mkdir()
    env = {**env, "TMPDIR": str(scratch)}
    steps = [
        [SYSTEM_PYTHON, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-input",
            "--disable-pip-version-check",
            str(src),
        ],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
        if done.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    shutil.rmtree(scratch)
    return venv


def make_world_readable(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        # World-readable on purpose: the dynamic user and nobody run what is in here.
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o444)


def _cgroup_mounts() -> list[tuple[Path, str, str]]:
    """(mount point, root inside the hierarchy, hierarchy key) of every cgroup mount."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        fstype, options = rfields[0], rfields[2] if len(rfields) > 2 else ""
        if fstype == "cgroup2":
            mounts.append((Path(fields[4]), fields[3], ""))
        elif fstype == "cgroup":
            names = [o for o in options.split(",") if o.startswith("name=")]
            controllers = [
                o
                for o in options.split(",")
                if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec") and "=" not in o
            ]
            mounts.append((Path(fields[4]), fields[3], ",".join(names or controllers)))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """hierarchy key -> this process's cgroup path, from /proc/self/cgroup."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, key, path = line.split(":", 2)
        own[key] = path
    return own


def _relative(path: str, root: str) -> str:
    if root != "/" and path.startswith(root):
        path = path[len(root) :]
    return path.strip("/")


def make_cgroups(name: str, cleanup: list[Path]) -> list[Path]:
    """Child cgroups for systemd in the hierarchies it manages (name=systemd and v2).

    Returns the cgroup.procs files to join. Every directory systemd may fill,
    in every hierarchy, is added to `cleanup` (before it exists) for removal.
    """
    own = _own_cgroups()
    base = _relative(own.get("name=systemd", own.get("", "/")), "/")
    join: list[Path] = []
    for mountpoint, root, key in _cgroup_mounts():
        # systemd names its cgroups after its name=systemd path, in every hierarchy.
        cleanup.append(mountpoint / _relative("/" + base, root) / name)
        if key in ("name=systemd", ""):
            directory = mountpoint / _relative(own.get(key, "/"), root) / name
            cleanup.append(directory)
            directory.mkdir()
            join.append(directory / "cgroup.procs")
    if not join:
        raise SandboxError("no name=systemd or cgroup2 hierarchy to give the sandbox a cgroup")
    return join


def remove_cgroups(directories: Sequence[Path], timeout: float = 5.0) -> list[str]:
    """rmdir each tree bottom-up (a cgroup empties a moment after its processes die)."""
    problems = []
    for top in directories:
        if not top.exists():
            continue
        deadline = time.monotonic() + timeout
        while True:
            try:
                for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                    Path(dirpath).rmdir()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    problems.append(f"{top}: {exc}")
                    break
                time.sleep(0.05)
    return problems


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _find_systemd(unshare: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if unshare.poll() is not None:
            raise SandboxError(f"the boot script failed (exit {unshare.returncode}):\n{log.read_text()}")
        for child in _children(unshare.pid):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child}/exe") == os.path.realpath(SYSTEMD):
                    return child
        time.sleep(0.02)
    raise SandboxError(f"systemd did not start within 10 s:\n{log.read_text()}")


def _wait_running(sandbox: Sandbox) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        state = sandbox.systemctl("is-system-running", check=False).stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.1)
    failed = sandbox.systemctl("list-units", "--failed", "--plain", check=False).stdout
    journal = sandbox.run("journalctl", "--no-pager", "-n", "40", check=False).stdout
    raise SandboxError(
        f"systemd in the sandbox is {state!r} after {BOOT_TIMEOUT:.0f} s\n{failed}\n{journal}"
        f"\n{sandbox.log.read_text()}"
    )


def _stop(unshare: subprocess.Popen[bytes], systemd_pid: int | None) -> None:
    # Killing a pid namespace's init kills every process in it.
    if systemd_pid is not None and unshare.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(systemd_pid, signal.SIGKILL)
    try:
        unshare.wait(10)
    except subprocess.TimeoutExpired:
        unshare.kill()  # our own unshare process; its --kill-child takes systemd along
        unshare.wait(10)


@contextlib.contextmanager
def booted(name_prefix: str = "portwatch-test-") -> Iterator[Sandbox]:
    """Boot the sandbox; everything is killed and removed on exit, whatever happened."""
    if os.geteuid() != 0:
        raise SandboxError("booting systemd in a namespace needs root")
    for tool in ("unshare", "nsenter", "setpriv", "systemctl", "journalctl", "systemd-analyze"):
        if shutil.which(tool) is None:
            raise SandboxError(f"{tool} is not installed")
    if not Path(SYSTEMD).exists() or not Path(SYSTEM_PYTHON).exists():
        raise SandboxError(f"{SYSTEMD} and {SYSTEM_PYTHON} are needed")
    env = _clean_env()
    workdir = Path(tempfile.mkdtemp(prefix=name_prefix, dir="/var/lib"))
    cleanup_cgroups: list[Path] = []
    unshare: subprocess.Popen[bytes] | None = None
    systemd_pid: int | None = None
    try:
        workdir.chmod(0o755)
        venv = install_venv(workdir, env)
        make_world_readable(workdir)
        log = workdir / "boot.log"
        join = make_cgroups(workdir.name, cleanup_cgroups)
        boot_env = {
            **env,
            # systemd's container mode: units meant for real hardware are skipped.
            "container": "portwatch-test",
            "PW_WORK": str(workdir),
            "PW_MASKED": MASKED,
            "PW_CGROUP_PROCS": " ".join(map(str, join)),
        }
        with log.open("wb") as out:
            unshare = subprocess.Popen(
                # pdeathsig + --kill-child: if pytest itself dies, the sandbox dies with it.
                [
                    "setpriv",
                    "--pdeathsig",
                    "KILL",
                    "unshare",
                    "--pid",
                    "--mount",
                    "--fork",
                    "--mount-proc",
                    "--kill-child=SIGKILL",
                    "bash",
                    "-c",
                    BOOT_SCRIPT,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=boot_env,
                cwd="/",
                start_new_session=True,
            )
        systemd_pid = _find_systemd(unshare, log)
        sandbox = Sandbox(systemd_pid, workdir, venv, log, env)
        _wait_running(sandbox)
        yield sandbox
    finally:
        if unshare is not None:
            _stop(unshare, systemd_pid)
        problems = remove_cgroups(list(dict.fromkeys(cleanup_cgroups)))
        shutil.rmtree(workdir, ignore_errors=True)
        if problems:
            raise SandboxError("could not remove the sandbox's cgroups: " + "; ".join(problems))


@pytest.fixture(scope="module")
def systemd_sandbox() -> Iterator[Sandbox]:
    """A booted systemd for the module; it fails the tests (never skips) when it cannot boot."""
    with contextlib.ExitStack() as stack:
        try:
            sandbox = stack.enter_context(booted())
        except SandboxError as exc:
            pytest.fail(f"cannot boot systemd in a namespace: {exc}")
        yield sandbox
