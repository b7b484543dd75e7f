"""A socket-activated server, run by systemd in the sandbox.

Usage: activated_server.py NAME          (Accept=no: serves on the listening socket in LISTEN_FDS)
       activated_server.py NAME accepted (Accept=yes: stdin is the one connection)
Each connection gets the line "NAME PID\\n", so a test knows which process answered.
"""

import os
import socket
import sys

SD_LISTEN_FDS_START = 3


def main() -> None:
    name = sys.argv[1]
    if sys.argv[2:] == ["accepted"]:
        with socket.socket(fileno=os.dup(0)) as conn:
            conn.sendall(f"{name} {os.getpid()}\n".encode())
        return
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("not socket-activated: expected one socket in LISTEN_FDS")
    with socket.socket(fileno=SD_LISTEN_FDS_START) as listening:
        while True:
            conn, _ = listening.accept()
            with conn:
                conn.sendall(f"{name} {os.getpid()}\n".encode())


if __name__ == "__main__":
    main()
