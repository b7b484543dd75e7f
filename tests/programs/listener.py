"""A real process that holds listening sockets, for the live tests.

Usage: listener.py SPEC_JSON
SPEC: {"sockets": [{"proto": "tcp"|"udp", "family": 4|6, "address": "...", "port": 0,
        "v6only": null|0|1}], "name_hex": "..." (prctl PR_SET_NAME), "fork": N,
        "connect_udp": bool}
Prints one JSON line once every socket is ready: {"pid", "children", "sockets": [{"port", "inode"}]}
then sleeps until killed. Forked children hold the same sockets (a pre-fork server).
"""

import ctypes
import json
import os
import signal
import socket
import sys
import time

PR_SET_NAME = 15


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("name_hex") is not None:
        name = bytes.fromhex(spec["name_hex"])
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    held = []
    report = []
    for s in spec["sockets"]:
        family = socket.AF_INET if s["family"] == 4 else socket.AF_INET6
        kind = socket.SOCK_STREAM if s["proto"] == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if s.get("v6only") is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, s["v6only"])
        sock.bind((s["address"], s.get("port", 0)))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        held.append(sock)
        report.append({"port": sock.getsockname()[1], "inode": os.fstat(sock.fileno()).st_ino})
    children = []
    for _ in range(spec.get("fork", 0)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(60)
        children.append(pid)
    print(json.dumps({"pid": os.getpid(), "children": children, "sockets": report}), flush=True)

    def stop(_sig: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
                os.waitpid(child, 0)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
