"""``board --emulate ACTION``: the emulated aarch64 board (see :mod:`targets.emulate`).

    setup        fetch and unpack it into the cache (once; --force rebuilds it); progress on stderr
    status       is it set up, where, what it holds
    rpc-server   TVM's RPC server inside it, registered with a tracker under a key (stops on Ctrl-C)
    python       run the board's Python with the arguments after ``--``
"""

from __future__ import annotations

import sys

from compiler import cli
from compiler.errors import UserError

ACTIONS = ("setup", "status", "rpc-server", "python")


def configure(p) -> None:
    p.add_argument("action", choices=ACTIONS, help="setup | status | rpc-server | python")
    p.add_argument("--emulate", action="store_true",
                   help="the emulated board (qemu-user on this machine); the only board this verb manages "
                        "(a real one is reached over RPC: tune --tracker)")
    p.add_argument("--force", action="store_true", help="setup: rebuild the board even when it is ready")
    p.add_argument("--tracker", metavar="HOST:PORT", help="rpc-server: the tracker to register with")
    p.add_argument("--key", help="rpc-server: the key to register under")
    p.add_argument("--port", type=int, default=9090, help="rpc-server: first port to listen on (default 9090)")
    p.add_argument("args", nargs="*", help="python: the guest Python's arguments (after --)")
    cli.add_json_arg(p)


def run(args) -> dict:
    from targets import emulate

    if not args.emulate:
        raise UserError("only the emulated board is managed here: pass --emulate (a real board needs no set-up "
                        "from this machine; see deploy/README.md of a board artifact)")
    if args.action == "setup":
        record = emulate.setup(force=args.force)
        print(f"emulated aarch64 board ready: {emulate.board_dir()}")
        _print_record(record)
        return {"board": str(emulate.board_dir()), **record}
    if args.action == "status":
        record = emulate.info()
        if record is None:
            problem = emulate.missing_host_tools()
            print(f"emulated aarch64 board: not set up (would be in {emulate.board_dir()}); "
                  + (f"cannot be set up here: {problem}" if problem else
                     "`python -m compiler board --emulate setup` sets it up"))
            return {"board": str(emulate.board_dir()), "ready": False, "problem": problem}
        print(f"emulated aarch64 board: ready in {emulate.board_dir()}")
        _print_record(record)
        return {"board": str(emulate.board_dir()), "ready": True, **record}
    if args.action == "python":
        emulate.ensure()
        proc = emulate.run_guest(list(args.args))
        if proc.returncode:
            raise UserError(f"the board's Python exited with {proc.returncode}")
        return {"returncode": 0}
    if not args.tracker or not args.key:
        raise UserError("rpc-server needs --tracker HOST:PORT and --key KEY (start a tracker with "
                        "`python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190`)")
    from targets import board_rpc

    return board_rpc.serve_foreground(args.tracker, args.key, args.port)


def _print_record(r: dict) -> None:
    print(f"  {r['machine']} Python {r['python']}, TVM {r['tvm']} runtime only, numpy {r['numpy']}, "
          f"glibc {r['glibc']}, via {r['qemu']}")
    print(f"  downloaded {r['downloaded_bytes'] / 1e6:.0f} MB, {r['disk_bytes'] / 1e6:.0f} MB on disk, "
          f"set up in {r['setup_seconds']:.0f} s on {r['created']}")
    print(f"  {r['note']}")
    sys.stdout.flush()
