"""The site's watchdog kills what a dead site left, except its model servers
(``fabric.endpoint.watchdog.leftovers``): servers outlive their site, a restarted site adopts
them, and they end on their idle timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from fabric.endpoint.watchdog import leftovers


def test_leftovers_spare_the_process_groups_of_model_servers() -> None:
    """A session like a site's: a worker in the leader's group, and a model server in a group
    of its own (as the jobs provider starts it), its child with it. Only the worker is left
    over for the watchdog to kill."""
    # The leader's own command line must not hold the mark: its group would be spared too.
    code = "MARK = 'fabric.engine.' + 'server'\n" + textwrap.dedent("""
        import subprocess, sys, time
        server = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, time; "
             "subprocess.Popen(['sleep', '60']); time.sleep(60)", MARK],
            process_group=0)
        worker = subprocess.Popen(["sleep", "60"])
        print(server.pid, worker.pid, flush=True)
        time.sleep(60)
    """)
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout is not None
        server, worker = (int(p) for p in leader.stdout.readline().split())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(leftovers(leader.pid)) < 1:
            time.sleep(0.05)
        time.sleep(0.3)  # the server's own child has started too
        left = leftovers(leader.pid)
        assert left == [worker], (left, server)
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(leader.pid)], check=False)
        leader.wait(10)
