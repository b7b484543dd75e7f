"""A DNS server on UDP 127.0.0.1:53 that holds its answers, for the ephemeral-socket tests.

Usage: dns_stub.py RELEASE_FILE
Prints "ready" once bound, then one JSON line per query: {"port": the client's port, "name": ...}.
Answers (A: 192.0.2.7; any other type: no data) only once RELEASE_FILE exists, so the client's
socket can be looked at while it waits.
"""

import json
import os
import socket
import struct
import sys
import time


def question(packet: bytes) -> tuple[str, int, int]:
    """The queried name, its type, and where the question ends."""
    labels, at = [], 12
    while packet[at]:
        length = packet[at]
        labels.append(packet[at + 1 : at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    qtype = struct.unpack("!H", packet[at + 1 : at + 3])[0]
    return ".".join(labels), qtype, at + 5


def answer(packet: bytes) -> bytes:
    _, qtype, end = question(packet)
    records = b""
    count = 0
    if qtype == 1:
        records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.7")
        count = 1
    header = packet[:2] + struct.pack("!HHHHH", 0x8180, 1, count, 0, 0)
    return header + packet[12:end] + records


def main() -> None:
    release = sys.argv[1]
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 53))
    print("ready", flush=True)
    held = []
    server.settimeout(0.01)
    while True:
        try:
            packet, client = server.recvfrom(4096)
        except TimeoutError:
            pass
        else:
            try:
                name = question(packet)[0]
            except (IndexError, struct.error):
                continue  # not a DNS query
            print(json.dumps({"port": client[1], "name": name}), flush=True)
            held.append((packet, client))
        if held and os.path.exists(release):
            for packet, client in held:
                server.sendto(answer(packet), client)
            held.clear()
        time.sleep(0.005)


if __name__ == "__main__":
    main()
