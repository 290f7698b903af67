"""TVM's RPC server inside the emulated aarch64 board (see :mod:`targets.emulate`), registered with a tracker.

    python -m compiler board --emulate rpc-server --tracker 127.0.0.1:9190 --key emu   # terminal 1
    python -m compiler tune --target aarch64-cpu --tracker 127.0.0.1:9190 --key emu --trials 64 ...

The server is ``python3 -m tvm.exec.rpc_server`` of the board's own Python (aarch64, TVM 0.27 runtime only, with
``libtvm_runtime_extra.so`` loaded for MetaSchedule's ``random_fill_for_measure``), started in a process group
of its own so that stopping it stops its session workers too. While it runs, a marker in the board folder
(``servers/``) tells ``tune`` that the server behind that tracker and key is emulated: the times it measures say
nothing about a real board, and tune says so in its output and the database's meta.

TVM's Python server stops serving (and leaves the tracker) when a session worker dies; the foreground
``rpc-server`` action watches the tracker and restarts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from compiler.errors import SettingError, UserError
from targets import emulate

REGISTER_TIMEOUT_S = 180.0  # the guest Python imports TVM under qemu: ~30 s here, more on a busy machine


def _marker_dir() -> Path:
    return emulate.board_dir() / "servers"


def _marker(tracker: str, key: str) -> Path:
    h = hashlib.sha256(f"{tracker}\n{key}".encode()).hexdigest()[:16]
    return _marker_dir() / f"{h}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def emulated_server(tracker: str, key: str) -> dict | None:
    """The record of a live emulated server registered (by this machine) with ``tracker`` under ``key``."""
    from compiler.tuning.tracker import parse_tracker

    host, port = parse_tracker(tracker)
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    for name in (f"{host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}"):
        path = _marker(name, key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(record.get("pid", -1))):
            return record
    return None


class EmulatedServer:
    """One TVM RPC server in the emulated board. ``start()``, ``wait_registered()``, ``stop()``."""

    def __init__(self, tracker: str, key: str, port: int = 9090, log_path: str | Path | None = None):
        from compiler.tuning.tracker import parse_tracker

        self.host, self.tracker_port = parse_tracker(tracker)
        self.tracker = f"{self.host}:{self.tracker_port}"
        self.key = key
        self.port = port
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EmulatedServer":
        emulate.ensure()
        extra = emulate.site_packages() / "tvm" / "lib" / "libtvm_runtime_extra.so"
        cmd = [str(emulate.python()), "-m", "tvm.exec.rpc_server", "--tracker", self.tracker, "--key", self.key,
               "--host", "127.0.0.1", "--port", str(self.port), "--port-end", str(self.port + 20)]
        if extra.is_file():
            cmd += ["--load-library", str(extra)]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=emulate.host_env(),
                                         start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        _marker_dir().mkdir(parents=True, exist_ok=True)
        _marker(self.tracker, self.key).write_text(json.dumps(
            {"pid": self.proc.pid, "tracker": self.tracker, "key": self.key, "note": emulate.TIMING_NOTE}))
        return self

    def registered(self) -> bool:
        from compiler.tuning.tracker import servers_for_key, tracker_summary

        try:
            return servers_for_key(tracker_summary(self.host, self.tracker_port, timeout=5), self.key) > 0
        except UserError:
            return False

    def wait_registered(self, timeout: float = REGISTER_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.registered():
            if self.proc is None or self.proc.poll() is not None:
                raise UserError(f"the emulated board's RPC server exited before it registered with the tracker "
                                f"{self.tracker}" + (f"; see {self.log_path}" if self.log_path else ""))
            if time.monotonic() > deadline:
                raise UserError(f"the emulated board's RPC server did not register with the tracker "
                                f"{self.tracker} within {timeout:.0f} s")
            time.sleep(1.0)

    def kill(self, sig=signal.SIGKILL) -> None:
        """Signal the server's whole process group (server and session workers)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(timeout=10)
            # the group's workers may outlive the server's main process: make sure they are gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            record = json.loads(_marker(self.tracker, self.key).read_text())
            if self.proc is None or record.get("pid") == self.proc.pid:
                _marker(self.tracker, self.key).unlink()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_foreground(tracker: str | None, key: str | None, port: int) -> dict:
    """``board --emulate rpc-server``: run until Ctrl-C; restart the server when it dies or leaves the tracker."""
    for field, value in (("tracker", tracker), ("key", key)):
        if not value:
            raise SettingError(field, "is needed: the RPC server registers with a tracker (HOST:PORT) under a key "
                                      "(start a tracker with `python -m tvm.exec.rpc_tracker --host 127.0.0.1 "
                                      "--port 9190`)")
    from compiler.tuning.tracker import parse_tracker, tracker_summary

    tracker_summary(*parse_tracker(tracker))  # a clear error now when no tracker answers there

    def on_term(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the server (and its workers) as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, on_term)
    restarts = 0
    server = EmulatedServer(tracker, key, port)
    try:
        while True:
            print(f"board: starting TVM's RPC server in the emulated aarch64 board (registers with {tracker} "
                  f"under key '{key}' in ~30 s)", file=sys.stderr, flush=True)
            server.start()
            server.wait_registered()
            print(f"board: RPC server registered with {tracker} under key '{key}' (pid {server.proc.pid}); "
                  f"{emulate.TIMING_NOTE}; Ctrl-C stops it", file=sys.stderr, flush=True)
            misses = 0
            while misses < 3:  # a server that stays alive but left the tracker (a dead session worker) is restarted
                time.sleep(2.0)
                misses = 0 if server.registered() else misses + 1
                if server.proc.poll() is not None:
                    break
            restarts += 1
            print(f"board: the RPC server stopped serving (left the tracker or exited); restarting it "
                  f"({restarts})", file=sys.stderr, flush=True)
            server.stop()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    return {"tracker": tracker, "key": key, "restarts": restarts}
