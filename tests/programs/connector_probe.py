"""What this kernel's proc connector does for the calling process, found without portwatch.

A minimal client of its own (socket, bind to the group, PROC_CN_MCAST_LISTEN,
then a fork it must hear of), so the tests can compare portwatch's behaviour
with what the kernel really does here instead of predicting it from a version
number. Prints one line:
  events            subscribed, and the fork was reported
  ack, no events    subscribed, but the fork never came
  no ack            the subscription was not acknowledged within a second
  ack error ENAME   the acknowledgement carried an error
  <step> ENAME      socket, bind or send failed with that errno
"""

import errno
import os
import random
import select
import socket
import struct

# Acknowledgements go to every listener: a number of its own tells this probe's apart.
ACK = random.randrange(1, 1 << 30)  # noqa: S311 (not a secret)


def probe() -> str:
    step = "socket"
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)  # NETLINK_CONNECTOR
        step = "bind"
        sock.bind((0, 1))  # CN_IDX_PROC
        step = "send"
        op = struct.pack("=I", 1)  # PROC_CN_MCAST_LISTEN
        cn_msg = struct.pack("=IIIIHH", 1, 1, 0, ACK, len(op), 0) + op
        sock.send(struct.pack("=IHHII", 16 + len(cn_msg), 3, 0, 0, 0) + cn_msg)
    except OSError as exc:
        return f"{step} {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def messages():
        while poller.poll(1000):
            data = sock.recv(256)
            if len(data) >= 60:
                # nlmsghdr (16), cn_msg (20: ack at 28), proc_event: what at 36, then the union at 52
                yield struct.unpack_from("=I", data, 28)[0], struct.unpack_from("=I", data, 36)[0], data

    for ack, what, data in messages():
        if what == 0 and ack == ACK + 1:
            err = struct.unpack_from("=i", data, 52)[0]
            if err:
                return f"ack error {errno.errorcode.get(err, err)}"
            break
    else:
        return "no ack"
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    for _ack, what, data in messages():
        if what == 1 and struct.unpack_from("=i", data, 60)[0] == pid:  # fork: child pid
            return "events"
    return "ack, no events"


print(probe())
