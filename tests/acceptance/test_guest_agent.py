# SPDX-License-Identifier: Apache-2.0
"""matchlock-guest's exec agent, driven over a socketpair by the independent Python protocol
client: output, exit codes and signals, stdin with backpressure, env/cwd/user, TTY, concurrency
and cancellation. The same agent runs as PID 1 in the VM (test_guest_vm.py)."""
import os
import pathlib
import socket
import struct
import subprocess
import time

import pytest

from framework import guestproto as gp

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def agent():
    binary = os.environ.get("MATCHLOCK_GUEST", str(ROOT / "build" / "matchlock-guest"))
    host, guest = socket.socketpair()
    proc = subprocess.Popen([binary, "agent", "--fd", str(guest.fileno())],
                            pass_fds=[guest.fileno()], stderr=subprocess.PIPE)
    guest.close()
    client = gp.Client(host)
    client.handshake()
    assert client.ready()["ok"] is True
    yield client
    host.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("agent did not exit when the channel closed")


def test_output_and_exit_code(agent):
    e = gp.Exec(agent, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    e.stdin(b"")
    ex = e.wait()
    assert ex["code"] == 3 and ex["signal"] == 0
    assert bytes(e.stdout) == b"out\n"
    assert bytes(e.stderr) == b"err\n"
    assert e.events[0] == gp.STARTED and e.events[-1] == gp.EXIT


def test_env_cwd_and_user(agent, tmp_path):
    e = gp.Exec(agent, ["sh", "-c", 'echo "$GREETING"; pwd; id -u; id -g'],
                env={"GREETING": "hi there"}, cwd=str(tmp_path), user="65534:65534")
    e.stdin(b"")
    assert e.wait()["code"] == 0
    assert bytes(e.stdout).decode().split("\n")[:4] == ["hi there", str(tmp_path), "65534",
                                                         "65534"]


def test_missing_command_and_bad_cwd(agent):
    e = gp.Exec(agent, ["definitely-not-a-command-xyz"])
    ex = e.wait()
    assert ex["code"] == 127 and "definitely-not-a-command-xyz" in ex["error"]
    e = gp.Exec(agent, ["true"], cwd="/nonexistent/dir")
    ex = e.wait()
    assert ex["code"] == 126 and "/nonexistent/dir" in ex["error"]
    e = gp.Exec(agent, ["true"], user="no-such-user-xyz")
    ex = e.wait()
    assert ex["code"] == 126 and "no-such-user-xyz" in ex["error"]


def test_death_by_signal(agent):
    e = gp.Exec(agent, ["sh", "-c", "kill -9 $$"])
    ex = e.wait()
    assert ex["signal"] == 9 and ex["code"] == 137


def test_stdin_round_trip_with_backpressure(agent):
    # 4 MiB through `cat`: more than every window and pipe buffer on the way, both directions.
    data = os.urandom(4 * 1024 * 1024)
    e = gp.Exec(agent, ["cat"])
    e.stdin(data)
    assert e.wait(timeout=120)["code"] == 0
    assert bytes(e.stdout) == data


def test_output_is_not_lost_when_the_host_reads_slowly(agent):
    # 8 MiB of output while the host grants credit late: the agent must pause, not drop.
    agent.grant = False
    e = gp.Exec(agent, ["sh", "-c", "head -c 8388608 /dev/zero | tr '\\0' 'x'"])
    e.stdin(b"")
    deadline = time.monotonic() + 10
    agent.pump(deadline, lambda: e.s.received >= agent.window)
    time.sleep(0.3)  # the guest has stopped: nothing beyond the window may arrive
    with pytest.raises(TimeoutError):
        agent.pump(time.monotonic() + 0.3, lambda: False)
    agent.grant = True
    e.drain()
    ex = e.wait(timeout=120)
    assert ex["code"] == 0
    assert len(e.stdout) == 8 * 1024 * 1024 and set(bytes(e.stdout)) == {ord("x")}


def test_tty_mode_and_resize(agent):
    e = gp.Exec(agent, ["sh", "-c", "tty; stty size; read line; echo got:$line"], tty=True,
                rows=50, cols=132)
    deadline = time.monotonic() + 30
    agent.pump(deadline, lambda: (e.drain(), b"50 132" in e.stdout)[1])
    e.stdin(b"hello\n", eof=False)
    ex = e.wait()
    out = bytes(e.stdout).decode()
    assert ex["code"] == 0
    assert "/dev/pts/" in out and "50 132" in out and "got:hello" in out
    assert not e.stderr  # a TTY merges stderr into the terminal


def test_two_concurrent_execs(agent):
    slow = gp.Exec(agent, ["sh", "-c", "sleep 1; echo slow"])
    fast = gp.Exec(agent, ["sh", "-c", "echo fast"])
    slow.stdin(b"")
    fast.stdin(b"")
    assert fast.wait()["code"] == 0
    assert slow.exit is None  # still running while the other finished
    assert slow.wait()["code"] == 0
    assert bytes(fast.stdout) == b"fast\n" and bytes(slow.stdout) == b"slow\n"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or reaped between the open and the read (ESRCH).
        return False


def test_cancel_kills_the_process_group_within_5s(agent):
    # The shell ignores SIGTERM; its child does not. Reset = client gone: SIGTERM to the group,
    # SIGKILL after the grace period (2 s here).
    e = gp.Exec(agent, ["sh", "-c", "trap '' TERM; sleep 100 & echo $!; wait"])
    deadline = time.monotonic() + 10
    agent.pump(deadline, lambda: (e.drain(), e.pid is not None and b"\n" in e.stdout)[1])
    # $! is the pid in the exec's own PID namespace; the host sees the shell's child by its own.
    [child] = map(int, open(f"/proc/{e.pid}/task/{e.pid}/children").read().split())
    assert alive(e.pid) and alive(child)
    start = time.monotonic()
    agent.send_frame(gp.RESET, e.s.id, struct.pack(">I", 8) + b"cancelled")
    while (alive(e.pid) or alive(child)) and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert not alive(e.pid) and not alive(child), "process group survived cancel"
    # The agent keeps serving.
    ok = gp.Exec(agent, ["true"])
    assert ok.wait()["code"] == 0


def test_signal_message_reaches_the_group(agent):
    e = gp.Exec(agent, ["sleep", "100"])
    agent.pump(time.monotonic() + 10, lambda: (e.drain(), e.pid is not None)[1])
    e.control(gp.SIGNAL, struct.pack(">I", 15))
    ex = e.wait(timeout=10)
    assert ex["signal"] == 15 and ex["code"] == 143


def test_protocol_violation_gets_goaway(agent):
    agent.send_frame(gp.DATA, 99, b"never opened")
    with pytest.raises(gp.ProtocolError, match="unknown stream"):
        agent.pump(time.monotonic() + 10, lambda: False)
