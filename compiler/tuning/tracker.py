"""The TVM RPC tracker a tuning session measures through: its address, its servers, and a watch on them.

TVM's own client retries for 60 s before it gives up, and MetaSchedule's RPCRunner waits for a session without a
time limit; here a wrong address or a stopped tracker is reported within seconds, and a session whose servers
all left is stopped (:func:`server_watchdog`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

from compiler.errors import SettingError, UserError

TRACKER_TIMEOUT_S = 5.0  # connecting to / asking the tracker; an unreachable tracker fails within this


def parse_tracker(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``; SettingError on the ``tracker`` field otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingError("tracker", f"must be HOST:PORT, got '{text}'")
    return host.strip("[]"), int(port)


def tracker_summary(host: str, port: int, timeout: float = TRACKER_TIMEOUT_S) -> dict:
    """The tracker's summary (``queue_info``, ``server_info``), or a UserError within about ``timeout`` seconds.

    TVM's own client retries for 60 s before it gives up; this speaks the tracker protocol directly with a
    socket timeout, so a wrong address or a stopped tracker is reported at once.
    """
    from tvm.rpc import base

    # the tracker binds the first free port in [--port, --port-end), and --port-end defaults to 9199
    hint = f"start it with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port} --port-end {port + 1}`"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise UserError(f"cannot reach the RPC tracker at {host}:{port} ({reason}); {hint}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise UserError(f"{host}:{port} answers, but it is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        reply = base.recvjson(sock)
    except (OSError, struct.error, ValueError, RuntimeError) as e:
        raise UserError(f"the RPC tracker at {host}:{port} did not answer within {timeout:.0f} s ({e}); "
                        f"is it a TVM RPC tracker? {hint}") from None
    finally:
        sock.close()
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise UserError(f"the RPC tracker at {host}:{port} gave an unexpected answer: {reply!r}")
    return reply[1]


def servers_for_key(summary: dict, key: str) -> int:
    n = 0
    for item in summary.get("server_info", []):
        k = str(item.get("key", ""))
        if k.split(":", 1)[-1] == key:
            n += 1
    return n


def check_tracker(tracker: str, key: str, timeout: float = TRACKER_TIMEOUT_S, wait: float = 0.0) -> int:
    """How many RPC servers are registered under ``key`` (at least 1, else UserError)."""
    host, port = parse_tracker(tracker)
    deadline = time.monotonic() + wait
    while True:
        summary = tracker_summary(host, port, timeout)
        n = servers_for_key(summary, key)
        if n or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not n:
        keys = sorted({str(i.get("key", "")).split(":", 1)[-1] for i in summary.get("server_info", [])})
        raise UserError(f"no RPC server is registered under key '{key}' at the tracker {host}:{port} "
                        f"(registered keys: {', '.join(keys) or 'none'}); on each board run "
                        f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")
    return n


def servers_alive(tracker: str, key: str) -> bool:
    try:
        return servers_for_key(tracker_summary(*parse_tracker(tracker)), key) > 0
    except UserError:
        return False  # the tracker itself is gone


def emulated_server(tracker: str, key: str) -> dict | None:
    """The record of the emulated board's RPC server behind ``tracker``/``key`` (targets.board_rpc), if it is one."""
    try:
        from targets.board_rpc import emulated_server as record

        return record(tracker, key)
    except Exception:  # noqa: BLE001 - no emulated board: a real one
        return None


@contextlib.contextmanager
def server_watchdog(progress, runner, tracker: str, key: str, grace: float):
    """Stop tuning when no server is registered under ``key`` for ``grace`` seconds.

    MetaSchedule's RPCRunner asks the tracker for a session without a time limit: with every server gone (killed,
    or TVM's Python server that stopped serving after a session worker died) a tune would wait for ever. A server
    that comes back within ``grace`` (a supervisor restarting it) is simply used again. Otherwise the runner's
    waiting workers are stopped, the measurement in flight fails, and the measure callback ends the tuning with
    its records in the database (``progress.server_lost`` says why)."""
    import threading

    done = threading.Event()

    def watch():
        lost_since = None
        while not done.wait(3.0):
            if servers_alive(tracker, key):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= grace:
                progress.server_lost = f"no server was registered under the key for {grace:.0f} s"
                _kill_runner_workers(runner)
                return

    thread = threading.Thread(target=watch, name="rpc-server-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _kill_runner_workers(runner) -> None:
    """Kill the runner's waiting worker processes; PopenWorker.kill() would close the pipe another thread is
    reading from and block on its lock: the reader gets EOF instead and the measurement fails."""
    from tvm.support.popen_pool import kill_child_processes

    pool = getattr(runner, "pool", None)
    for worker in list(getattr(pool, "_worker_map", {}).values()):
        proc = getattr(worker, "_proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                kill_child_processes(proc.pid)
                proc.kill()
