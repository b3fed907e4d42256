import os
import socket
import struct
import time

import pytest
import trio

from daemon.systemd import Notifier, run_watchdog


class Receiver:
    """A stand-in for systemd's notify socket that learns each sender's pid."""

    def __init__(self, sock: socket.socket, env_address: str) -> None:
        self.sock = sock
        self.env_address = env_address

    def recv(self) -> tuple[int, list[str]]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [
            struct.unpack("3i", cdata[:12])[0]
            for level, kind, cdata in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1
        return pids[0], data.decode().split("\n")

    def recv_all(self) -> list[list[str]]:
        messages = []
        while True:
            try:
                messages.append(self.recv()[1])
            except BlockingIOError:
                return messages


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        env_address = str(tmp_path / "notify")
        sock.bind(env_address)
    else:
        env_address = f"@jobd-test-{os.getpid()}"
        sock.bind("\0" + env_address[1:])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(2)
    with sock:
        yield Receiver(sock, env_address)


def notifier_for(receiver: Receiver) -> Notifier:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_address})
    assert notifier.enabled
    return notifier


def test_lifecycle_messages_come_from_this_pid(receiver):
    notifier = notifier_for(receiver)

    assert notifier.ready("ready; 0 jobs running")
    assert receiver.recv() == (
        os.getpid(),
        ["READY=1", "STATUS=ready; 0 jobs running", f"MAINPID={os.getpid()}"],
    )

    notifier.status("draining 3 jobs")
    assert receiver.recv()[1] == ["STATUS=draining 3 jobs"]

    notifier.stopping("draining")
    assert receiver.recv()[1] == ["STOPPING=1", "STATUS=draining"]

    notifier.extend_timeout(12.5)
    assert receiver.recv()[1] == ["EXTEND_TIMEOUT_USEC=12500000"]

    notifier.watchdog()
    assert receiver.recv()[1] == ["WATCHDOG=1"]


def test_ready_without_status(receiver):
    notifier_for(receiver).ready()
    assert receiver.recv()[1] == ["READY=1", f"MAINPID={os.getpid()}"]


def test_reloading_carries_monotonic_usec(receiver):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier_for(receiver).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = receiver.recv()[1]
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_values_cannot_inject_extra_assignments(receiver):
    notifier = notifier_for(receiver)
    notifier.notify(STATUS="ok\nREADY=1", ERRNO=5)
    assert receiver.recv()[1] == ["STATUS=ok READY=1", "ERRNO=5"]
    notifier.status("line one\nline two")
    assert receiver.recv()[1] == ["STATUS=line one line two"]
    with pytest.raises(ValueError):
        notifier.send("STATUS=a\nREADY=1")


async def test_watchdog_pings_repeatedly_from_the_loop(receiver, autojump_clock):
    notifier = notifier_for(receiver)
    receiver.sock.setblocking(False)
    start = trio.current_time()
    with trio.move_on_after(10.5):
        await run_watchdog(notifier, 2.0)
    assert trio.current_time() - start == pytest.approx(10.5)
    # Pings at t = 0, 2, 4, 6, 8, 10.
    assert receiver.recv_all() == [["WATCHDOG=1"]] * 6


async def test_watchdog_rejects_nonpositive_interval():
    with pytest.raises(ValueError):
        await run_watchdog(Notifier(None), 0)


def test_noop_without_notify_socket():
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("ready")
    assert not notifier.watchdog()
    assert notifier.watchdog_interval({"WATCHDOG_USEC": "1000000"}) is None


def test_vsock_is_ignored(caplog):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_missing_socket_does_not_raise(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="daemon.systemd")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert "systemd notify failed" in caplog.text


def test_closed_receiver_does_not_raise(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the path stays but nobody listens: ECONNREFUSED
    assert Notifier.from_env({"NOTIFY_SOCKET": str(path)}).watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "100000"}, 0.05),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert notifier.watchdog_interval(env) == expected
