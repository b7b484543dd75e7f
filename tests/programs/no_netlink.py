"""Run the rest of argv with socket(AF_NETLINK, ...) refused (EAFNOSUPPORT), as systemd's
RestrictAddressFamilies= refuses it: a seccomp filter, then exec."""

import ctypes
import os
import struct
import sys

# (AUDIT_ARCH_*, the socket syscall's number) by machine
ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
AF_NETLINK, EAFNOSUPPORT = 16, 97
LD, JEQ, RET = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K


class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def main() -> None:
    arch, nr_socket = ARCH[os.uname().machine]
    program = [
        (LD, 0, 0, 4), (JEQ, 0, 5, arch),  # seccomp_data.arch
        (LD, 0, 0, 0), (JEQ, 0, 3, nr_socket),  # .nr
        (LD, 0, 0, 16), (JEQ, 0, 1, AF_NETLINK),  # .args[0], low half
        (RET, 0, 0, 0x00050000 | EAFNOSUPPORT),  # SECCOMP_RET_ERRNO
        (RET, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
    fprog = Fprog(len(program), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "prctl")
    os.execv(sys.argv[1], sys.argv[1:])  # noqa: S606 (argv as given, no shell)


main()
