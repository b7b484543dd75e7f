"""Fork N idle processes (argv[1]), print "ready", and end them all when stdin closes.

Stands in for a busy host: the one-shot views share their walk of /proc with
forked helpers only when there are a few hundred processes to walk.
"""

import os
import signal
import sys

children = []
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        while True:
            signal.pause()
    children.append(pid)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()  # until the test closes it (or dies)
for pid in children:  # ours, by pid
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
