"""What would let portwatch inspect the processes it was refused, in words for the administrator.

Reading another user's /proc/<pid>/fd takes CAP_SYS_PTRACE and
CAP_DAC_READ_SEARCH (root has both, unless a container or a bounding set took
them away). When they are held and the kernel still refuses, no capability
will help: a security module (Yama, AppArmor, SELinux), or a process of
another user namespace (a non-dumpable one, such as a sandbox's PID 1) or
pid namespace is the cause, and saying "run as root" would send the reader
the wrong way.
"""

from __future__ import annotations

CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
NEEDED = (("CAP_SYS_PTRACE", CAP_SYS_PTRACE), ("CAP_DAC_READ_SEARCH", CAP_DAC_READ_SEARCH))


def lacking(effective: int | None, euid: int) -> list[str]:
    """The capabilities needed and not held (`effective` unknown: root is assumed to hold them)."""
    if effective is None:
        return [] if euid == 0 else [name for name, _bit in NEEDED]
    return [name for name, bit in NEEDED if not effective >> bit & 1]


def advice(effective: int | None, euid: int) -> str:
    """What is missing, for a hint on stderr and the daemon's `degraded` event."""
    missing = lacking(effective, euid)
    names = " and ".join(missing)
    if missing and euid != 0:
        return f"run as root, or grant {names}"
    if missing:
        return f"root runs without {names} here (a container or a capability bounding set); grant it"
    return (
        "the kernel refused access even with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH "
        "(a security module, or processes of another user or pid namespace)"
    )
