"""The tune verb and tuning databases, with a real TVM RPC tracker and server on 127.0.0.1 (no mocks).

One short MetaSchedule run of ResNet8 goes through the tracker to the server; its database is then applied by
the build's compile hook (targets.compile_module) and the tuned module must still match PyTorch. Around it:
refusing logs made for another target / model / variant, a torn database line, the variant name, resuming
through the CLI, and an unreachable tracker failing fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler import cli
from compiler.errors import UserError
from compiler.models import build_model
from compiler.tuning import database
from helpers import randomize_bn, saved_resnet8

KEY = "tune-test"
TRIALS = 12  # ResNet8 has 12 kernels: one trial each (trials-per-iter 1)
POPULATION = 16  # a small evolutionary search: this is a plumbing test, not a tuning run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server forks a child per session: stop its whole group
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def rpc_farm():
    """A TVM RPC tracker and one server under KEY, both on 127.0.0.1 with free ports."""
    from compiler.tuning.tracker import servers_for_key, tracker_summary

    port = free_port()
    tracker = _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                      "--port-end", str(port + 1), "--silent"])
    server = None
    try:
        deadline = time.monotonic() + 120  # `import tvm` alone takes seconds on a busy machine
        while True:
            if tracker.poll() is not None:
                pytest.fail(f"rpc_tracker exited: {tracker.stderr.read().decode()[-2000:]}")
            try:
                tracker_summary("127.0.0.1", port, timeout=2)
                break
            except UserError:
                if time.monotonic() > deadline:
                    pytest.fail("rpc_tracker did not come up")
                time.sleep(0.5)
        sport = free_port()
        server = _start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                         "--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 50)])
        while servers_for_key(tracker_summary("127.0.0.1", port, timeout=2), KEY) < 1:
            if server.poll() is not None:
                pytest.fail(f"rpc_server exited: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("rpc_server did not register with the tracker")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if server is not None:
            _stop(server)
        _stop(tracker)


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory):
    return saved_resnet8(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def host():
    import targets

    return targets.get("host")


@pytest.fixture(scope="module")
def lowered(resnet8):
    from compiler.build import lower

    return lower(resnet8[0], 1, "fp32").module


@pytest.fixture(scope="module")
def tuned(rpc_farm, lowered, host, tmp_path_factory):
    """One short tuning run through the tracker into a fresh database folder."""
    from compiler.tuning.session import tune_module

    directory = tmp_path_factory.mktemp("logs") / "host" / "resnet8-db"
    t0 = time.perf_counter()
    result = tune_module(lowered, host, "resnet8", "fp32", 1, TRIALS, directory=directory, tracker=rpc_farm,
                         key=KEY, trials_per_iter=1, population=POPULATION, seed=0, show_progress=False)
    result["wall"] = time.perf_counter() - t0
    return result


def test_unreachable_tracker_fails_fast(capsys, resnet8):
    port = free_port()  # nothing listens there
    t0 = time.perf_counter()
    rc = cli.main(["tune", "--target", "host", "--checkpoint", str(resnet8[1]), "--trials", "4",
                   "--tracker", f"127.0.0.1:{port}", "--key", KEY])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach the RPC tracker at 127.0.0.1:{port}" in err and "rpc_tracker" in err
    assert took < 20


def test_silent_tracker_times_out():
    """Something that accepts the connection but never speaks: bounded by the socket timeout, not TVM's 60 s."""
    from compiler.tuning.tracker import check_tracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="did not answer"):
            check_tracker(f"127.0.0.1:{s.getsockname()[1]}", KEY, timeout=2)
        assert time.perf_counter() - t0 < 10


def test_no_server_under_key(rpc_farm):
    from compiler.tuning.tracker import check_tracker

    assert check_tracker(rpc_farm, KEY) == 1
    with pytest.raises(UserError, match="no RPC server is registered under key 'nobody'.*rpc_server"):
        check_tracker(rpc_farm, "nobody")
    with pytest.raises(UserError, match="HOST:PORT"):
        check_tracker("localhost", KEY)


def test_rpc_tuning_writes_database_that_build_applies(tuned, lowered, resnet8, host):
    import targets
    import tvm
    from tvm import relax

    from compiler.build import run_module

    directory = Path(tuned["log_dir"])
    assert (directory / database.WORKLOAD_FILE).is_file() and (directory / database.RECORD_FILE).is_file()
    assert tuned["trials"] == TRIALS and tuned["trials_total"] == TRIALS
    assert tuned["runner"].startswith("rpc 127.0.0.1:")
    assert tuned["tasks_in_db"] >= len(tuned["tasks"]) - 2, tuned["tasks"]  # a kernel may fail its one trial
    meta = json.loads((directory / database.META_FILE).read_text())
    assert meta["target"]["name"] == "host" and meta["model"] == "resnet8"
    assert meta["variant"] == tuned["variant"] == database.variant_of(lowered, "fp32")
    assert meta["trials"] == TRIALS and meta["sessions"][-1]["completed"]
    assert json.loads(json.dumps(meta)) == meta

    db, info = database.find_database(host, "resnet8", tuned["variant"], explicit_dir=directory)
    assert db is not None and info["tasks_in_db"] == tuned["tasks_in_db"] and len(info["sha256"]) == 64
    applied = database.tasks_applied(lowered, host, db)
    assert applied["tasks"] == len(tuned["tasks"])
    assert applied["applied"] == tuned["tasks_in_db"], applied

    # the build's own pipeline applies the same schedules (its legalize half must match ours for that)
    with host.tvm_target():
        final = targets.relax_pipeline(host, db)(lowered)
    scheduled = [gv.name_hint for gv, f in final.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs]
    assert len(scheduled) >= applied["applied"] > 0

    executable = targets.compile_module(lowered, host, database=db)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.inference_mode():
        ref = resnet8[0](x).numpy()
    got = run_module(executable, x.numpy(), 1)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    # and MetaSchedule's own compile_relax reads the same database
    from tvm.s_tir.meta_schedule.relax_integration import compile_relax

    vm = relax.VirtualMachine(compile_relax(db, lowered, host.tvm_target(), params=None), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x[:1].numpy())).numpy()
    np.testing.assert_allclose(out, ref[:1], atol=1e-4, rtol=1e-4)


def test_resume_through_the_cli_continues_the_database(tuned, resnet8, capsys):
    """The same command again (here with the local runner) appends to the same database.

    Regression: a handler without a name on MetaSchedule's logger (pytest 9.2's capture handler, or one the
    user's program installed) broke MetaSchedule's logger set-up with an AttributeError; tune must not care."""
    import logging

    directory = Path(tuned["log_dir"])
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = logging.StreamHandler()  # get_name() is None
    ms_logger.addHandler(foreign)
    try:
        rc = cli.main(["tune", "--target", "host", "--checkpoint", str(resnet8[1]), "--precision", "fp32",
                       "--trials", "2", "--trials-per-iter", "1", "--population", str(POPULATION),
                       "--log-dir", str(directory), "--json"])
    finally:
        ms_logger.removeHandler(foreign)
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= {"log_dir", "tasks", "trials", "seconds", "variant"}
    assert result["variant"] == tuned["variant"] and result["trials"] == 2
    assert result["trials_total"] == TRIALS + 2
    meta = json.loads((directory / database.META_FILE).read_text())
    assert meta["trials"] == TRIALS + 2 and len(meta["sessions"]) == 2 and meta["sessions"][1]["runner"] == "local"
    # measured at the thread count the target's parallel loops are sized for (TVM's own default would be half the
    # logical CPUs: one on a 2-vCPU VM), unless the user's TVM_NUM_THREADS says otherwise
    from compiler import threads

    wanted = threads.user_tvm_threads() or meta["sessions"][1]["target"]["num-cores"]
    assert meta["sessions"][1]["threads"] == wanted and os.environ["TVM_NUM_THREADS"] == str(wanted)
    assert "task" in out and "best_ms" in out  # the summary table


def _fake_log(directory: Path, spec, model: str, variant: str) -> Path:
    import tvm

    directory.mkdir(parents=True)
    database.write_meta(directory, database.new_meta(spec, tvm.target.Target(spec.target_json()), model, variant,
                                                 "fp32", 1, [], []))
    (directory / database.WORKLOAD_FILE).write_text("")
    (directory / database.RECORD_FILE).write_text("")
    return directory


def test_logs_for_another_target_model_or_variant_are_refused(tmp_path, host, lowered):
    import targets

    from compiler.tuning.session import tune_module

    variant = database.variant_of(lowered, "fp32")
    tx2 = _fake_log(tmp_path / "tx2", targets.get("jetson-tx2"), "resnet8", variant)
    with pytest.raises(UserError, match="tuned for target 'jetson-tx2', not 'host'"):
        database.find_database(host, "resnet8", variant, explicit_dir=tx2)
    other_model = _fake_log(tmp_path / "r20", host, "resnet20", variant)
    with pytest.raises(UserError, match="tuned for model 'resnet20', not 'resnet8'"):
        database.find_database(host, "resnet8", variant, explicit_dir=other_model)
    other_variant = _fake_log(tmp_path / "var", host, "resnet8", "fp32-00000000")
    with pytest.raises(UserError, match="variant fp32-00000000"):
        database.find_database(host, "resnet8", variant, explicit_dir=other_variant)
    # tune refuses to append to them too, before any tuning starts
    with pytest.raises(UserError, match="tuned for model 'resnet20'"):
        tune_module(lowered, host, "resnet8", "fp32", 1, 4, directory=other_model)
    # a database folder without meta.json cannot be checked: refused
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / database.WORKLOAD_FILE).write_text("")
    (bare / database.RECORD_FILE).write_text("")
    with pytest.raises(UserError, match="no meta.json"):
        database.find_database(host, "resnet8", variant, explicit_dir=bare)
    with pytest.raises(UserError, match="does not exist"):
        database.find_database(host, "resnet8", variant, explicit_dir=tmp_path / "missing")

    # automatic lookup: nothing there -> untuned; host tuned on another CPU -> skipped with a note
    db, info = database.find_database(host, "resnet8", variant, root=tmp_path / "root")
    assert db is None and info["path"] is None and "untuned" in info["note"]
    other_cpu = dataclasses.replace(host, device=dict(host.device, mcpu="some-other-cpu"))
    _fake_log(database.log_dir("host", "resnet8", variant, tmp_path / "root"), other_cpu, "resnet8", variant)
    db, info = database.find_database(host, "resnet8", variant, root=tmp_path / "root")
    assert db is None and "some-other-cpu" in info["note"]


SAME_CLASS = {"x86-64-v4-vnni": ("rocketlake", "icelake-server"), "x86-64-v4": ("skylake-avx512", "cascadelake"),
              "x86-64-v3": ("haswell", "znver3")}
LOWER_OR_HIGHER = {"x86-64-v4-vnni": "znver3", "x86-64-v4": "znver4", "x86-64-v3": "znver4"}


def test_records_tuned_on_another_cpu_of_the_same_isa_class_apply(tmp_path, host, lowered):
    """Issue 14: a database tuned on another CPU with the same ISA class (e.g. Zen 4 -> Rocket Lake, both AVX-512
    VNNI) is applied and the manifest says why; one from another class (AVX2-only vs AVX-512) is skipped."""
    import targets

    cls = targets.cpu_class(host.device["mcpu"])
    if cls is None:
        pytest.skip(f"this CPU ({host.device['mcpu']}) is in no x86-64 class (v3/v4): nothing to borrow")
    variant = database.variant_of(lowered, "fp32")
    root = tmp_path / "root"
    other = next(c for c in SAME_CLASS[cls] if c != host.device["mcpu"])
    assert targets.cpu_class(other) == cls
    directory = database.log_dir("host", "resnet8", variant, root)
    _fake_log(directory, dataclasses.replace(host, device=dict(host.device, mcpu=other)), "resnet8", variant)
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert db is not None and info["match"].startswith(f"same ISA class {cls}") and other in info["match"]
    assert database.manifest_entry(info, None)["match"] == info["match"]
    shutil.rmtree(directory)
    foreign = LOWER_OR_HIGHER[cls]
    _fake_log(directory, dataclasses.replace(host, device=dict(host.device, mcpu=foreign)), "resnet8", variant)
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert db is None and "skipped" in info["note"] and f"ISA class {targets.cpu_class(foreign)}" in info["note"]


def test_a_reader_gets_each_workloads_best_record_as_the_json_database_ranks_them():
    """build's reader keeps one record per workload: the one MetaSchedule's JSONDatabase puts first (on a
    committed database: 1,216 records of 16 workloads)."""
    from tvm.s_tir import meta_schedule as ms

    directory = database.DEFAULT_ROOT / "host" / "resnet56-int8-810cd591@znver1"
    best = database.open_database(directory)  # registers the int8 intrinsics the traces name
    full = ms.database.JSONDatabase(path_workload=str(directory / database.WORKLOAD_FILE),
                                    path_tuning_record=str(directory / database.RECORD_FILE))
    counts = database.summarize(directory)
    assert len(full) == counts["records"] > len(best) == counts["tasks_in_db"] > 0
    for record in best.get_all_tuning_records():
        top = full.get_top_k(full.commit_workload(record.workload.mod), 1)[0]
        assert str(top.trace) == str(record.trace)
        assert [float(v) for v in top.run_secs] == [float(v) for v in record.run_secs]


def _record_lines(directory: Path) -> list[bytes]:
    return (directory / database.RECORD_FILE).read_bytes().splitlines()


def test_keep_best_trims_each_kernel_to_its_best_records_and_build_applies_the_same(tmp_path):
    """tune --keep-best N (database.keep_best) on a committed database of real measurements (1,216 records of 16
    kernels): each kernel keeps its N fastest valid records, in their original order; what build applies (each
    kernel's best) is unchanged; a second trim changes nothing."""
    directory = tmp_path / "db"
    shutil.copytree(database.DEFAULT_ROOT / "host" / "resnet56-int8-810cd591@znver1", directory,
                    ignore=shutil.ignore_patterns("logs", ".lock"))
    before = _record_lines(directory)
    best_before = [str(r.trace) for r in database.open_database(directory).get_all_tuning_records()]
    valid: dict[int, list[float]] = {}
    for line in before:
        idx, record = json.loads(line)
        secs = [float(v) for v in record[1] or []]
        if secs and not all(v == database.FAILED_SECS for v in secs):
            valid.setdefault(idx, []).append(sum(secs) / len(secs))

    kept = database.keep_best(directory, 3)

    after = _record_lines(directory)
    assert kept == {"keep_best": 3, "records_before": len(before), "records_after": len(after)}
    assert len(after) == sum(min(3, len(v)) for v in valid.values()) < len(before)
    positions = [before.index(line) for line in after]
    assert positions == sorted(positions)  # a subsequence of the original file
    for idx, means in valid.items():
        mine = sorted(sum(map(float, r[1])) / len(r[1]) for i, r in map(json.loads, after) if i == idx)
        assert mine == sorted(means)[:3], idx
    assert [str(r.trace) for r in database.open_database(directory).get_all_tuning_records()] == best_before
    assert database.keep_best(directory, 3)["records_after"] == len(after) and _record_lines(directory) == after
    with pytest.raises(UserError, match="at least 1"):
        database.keep_best(directory, 0)


def test_tune_keep_best_with_no_trials_only_trims(tuned, resnet8, tmp_path, capsys):
    """--trials 0 --keep-best N trims a database without measuring (meta.json still counts every trial measured);
    --trials 0 alone, or on a folder with no database, is refused with one line."""
    directory = tmp_path / "host" / "resnet8-db"
    shutil.copytree(tuned["log_dir"], directory, ignore=shutil.ignore_patterns("logs", ".lock"))
    lines = _record_lines(directory)
    slower = []
    for line in lines:  # the same schedules measured again, twice as slow: what trimming must drop
        idx, record = json.loads(line)
        if record[1]:
            record[1] = [2 * float(v) for v in record[1]]
            slower.append(json.dumps([idx, record]).encode())
    (directory / database.RECORD_FILE).write_bytes(b"".join(x + b"\n" for x in lines + slower))
    measured = json.loads((directory / database.META_FILE).read_text())["trials"]
    args = ["tune", "--target", "host", "--checkpoint", str(resnet8[1]), "--precision", "fp32",
            "--log-dir", str(directory)]

    rc = cli.main([*args, "--trials", "0", "--keep-best", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    tasks = database.summarize(directory)["tasks_in_db"]
    assert result["trials"] == 0 and result["kept"]["records_before"] == len(lines) + len(slower)
    assert result["kept"]["records_after"] == len(_record_lines(directory)) == tasks == tuned["tasks_in_db"]
    assert "kept the best 1 records of each kernel" in out
    meta = json.loads((directory / database.META_FILE).read_text())
    assert meta["trials"] == measured and meta["keep_best"] == 1 and meta["sessions"][-1]["trials"] == 0

    assert cli.main([*args, "--trials", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--keep-best" in err[0]
    empty = [a if a != str(directory) else str(tmp_path / "host" / "none") for a in args]
    assert cli.main([*empty, "--trials", "0", "--keep-best", "1"]) == 2
    assert "nothing to trim" in capsys.readouterr().err


def test_torn_last_line_is_repaired(tuned, tmp_path):
    src = Path(tuned["log_dir"])
    directory = tmp_path / "copy"
    shutil.copytree(src, directory, ignore=shutil.ignore_patterns("logs", ".lock"))
    before = database.summarize(directory)
    records = (directory / database.RECORD_FILE).read_bytes()
    last = records.rstrip(b"\n").split(b"\n")[-1]
    torn = records + last[: len(last) // 2]  # killed mid-append
    (directory / database.RECORD_FILE).write_bytes(torn)
    # a reader (build) skips the torn line and leaves the files alone (a tune may be appending)
    db = database.open_database(directory)
    assert len(db.get_all_tuning_records()) == before["tasks_in_db"]  # each workload's best
    assert (directory / database.RECORD_FILE).read_bytes() == torn
    # the writer (tune, holding the lock) repairs in place
    fixed = database.repair(directory)
    assert fixed["dropped_lines"] == 1 and fixed["needed"]
    assert (directory / database.RECORD_FILE).read_bytes() == records
    assert not database.repair(directory)["needed"]
    # a complete last line that lost its newline gets it back (else the next append would glue onto it)
    (directory / database.RECORD_FILE).write_bytes(records.rstrip(b"\n"))
    assert database.repair(directory)["added_newlines"] == 1
    assert (directory / database.RECORD_FILE).read_bytes() == records
    # a damaged line in the middle is corruption, not a crash: refused
    lines = records.split(b"\n")
    (directory / database.RECORD_FILE).write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]))
    with pytest.raises(UserError, match="corrupt"):
        database.repair(directory)


def test_variant_names_stripped_shapes_precision_and_batch(lowered, resnet8):
    from compiler.build import lower

    v = database.variant_of(lowered, "fp32")
    assert v.startswith("fp32-") and len(v) == len("fp32-") + 8
    first = database.shape_signature(lowered)[0]  # the stem conv: data (batch 1) and weight shapes
    assert first[0] == "relax.nn.conv2d" and first[1][0] == [[1, 3, 32, 32], "float32"]
    # other weights, same shapes: same variant (tuning depends on shapes only)
    torch.manual_seed(1)
    other = build_model("resnet8").eval()
    randomize_bn(other, seed=1)
    mod_other = lower(other, 1, "fp32").module
    assert database.variant_of(mod_other, "fp32") == v
    # zeroed (pruned) filters strip to other shapes: another variant
    with torch.no_grad():
        for m in other.modules():
            if hasattr(m, "conv1") and hasattr(m, "bn2"):
                m.conv1.weight[: m.conv1.out_channels // 2] = 0
                m.bn1.weight[: m.conv1.out_channels // 2] = 0
                m.bn1.bias[: m.conv1.out_channels // 2] = 0
    mod_pruned = lower(other, 1, "fp32").module
    assert database.variant_of(mod_pruned, "fp32") != v
    assert database.variant_of(lowered, "fp16") != v.replace("fp32", "fp16")  # precision is in the hash too
    assert database.log_dir("host", "resnet8", v, "/x") == Path("/x/host/resnet8-" + v)
    with pytest.raises(UserError):
        database.log_dir("../etc", "resnet8", v)


def test_build_verb_applies_the_database(tuned, resnet8, tmp_path, tiny_cifar):
    """`build --tuning-log DIR`: the manifest names the database and how many kernels it scheduled."""
    import targets

    out = tmp_path / "art"
    rc = cli.main(["build", "--target", "host", "--checkpoint", str(resnet8[1]), "--precision", "fp32",
                   "--data", str(tiny_cifar), "--out", str(out), "--tuning-log", tuned["log_dir"]])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["tuning"]
    assert t["database"] == tuned["log_dir"]
    assert t["sha256"] == database.fileio.sha256_file(Path(tuned["log_dir"]) / database.RECORD_FILE)
    assert t["tasks_applied"] == database.summarize(tuned["log_dir"])["tasks_in_db"] > 0
    # a log for another model is refused by build too
    other = _fake_log(tmp_path / "other", targets.get("host"), "resnet20", tuned["variant"])
    assert cli.main(["build", "--target", "host", "--checkpoint", str(resnet8[1]), "--precision", "fp32",
                     "--data", str(tiny_cifar), "--out", str(tmp_path / "art2"), "--tuning-log", str(other)]) == 2


def _class_folders(host, lowered, tmp_path):
    """(this CPU's x86-64 class, the fp32 variant, a tuning_logs root, its usual folder there, another CPU of the
    class); skips where the CPU is in no class."""
    import targets

    cls = targets.cpu_class(host.device["mcpu"])
    if cls is None:
        pytest.skip(f"this CPU ({host.device['mcpu']}) is in no x86-64 class (v3/v4)")
    variant = database.variant_of(lowered, "fp32")
    root = tmp_path / "root"
    other = next(c for c in SAME_CLASS[cls] if c != host.device["mcpu"])
    return cls, variant, root, database.log_dir("host", "resnet8", variant, root), other


def test_a_second_cpu_of_a_class_tunes_into_its_own_database_and_build_prefers_it(tmp_path, host, lowered):
    """A database holds one CPU's measurements: when tuning_logs/host/<model>-<variant> was tuned on another CPU
    of this class (Zen 3 records on a Zen 1), tune writes <model>-<variant>@<mcpu> beside it instead of mixing
    timings of two machines, and build then applies this CPU's own records before the borrowed ones."""
    import targets

    cls, variant, root, primary, other = _class_folders(host, lowered, tmp_path)
    assert database.tune_dir(host, primary) == primary  # free: the usual folder
    _fake_log(primary, dataclasses.replace(host, device=dict(host.device, mcpu=other)), "resnet8", variant)
    own = database.tune_dir(host, primary)
    assert own == primary.parent / f"{primary.name}@{host.device['mcpu']}"
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert info["path"] == str(primary) and info["match"].startswith("same ISA class")  # borrowed until then
    _fake_log(own, host, "resnet8", variant)
    assert database.tune_dir(host, primary) == own  # the next tune continues it
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert info["path"] == str(own) and info["match"] == "exact"
    # a database of another class in the free name (the kernel library's folder has no layout hash, so an AVX2
    # library and a VNNI one share it): this CPU tunes into its own sibling, and build skips the foreign one
    foreign = LOWER_OR_HIGHER[cls]
    shutil.rmtree(own)
    shutil.rmtree(primary)
    _fake_log(primary, dataclasses.replace(host, device=dict(host.device, mcpu=foreign)), "resnet8", variant)
    assert database.tune_dir(host, primary) == own
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert db is None and "ISA class" in info["note"]  # the other class's records are not applied
    _fake_log(own, host, "resnet8", variant)
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert info["path"] == str(own) and info["match"] == "exact"
    # a database of another target altogether still keeps the name: check_meta refuses it with its reason
    shutil.rmtree(own)
    shutil.rmtree(primary)
    _fake_log(primary, targets.get("jetson-tx2"), "resnet8", variant)
    assert database.tune_dir(host, primary) == primary


def _timed_at(directory: Path, threads: int | None) -> None:
    meta = database.read_meta(directory)
    meta["sessions"] = [{"trials": 8} if threads is None else {"trials": 8, "threads": threads}]
    database.write_meta(directory, meta)


def test_build_prefers_records_timed_at_its_thread_count_to_this_cpus_own(tmp_path, host, lowered, monkeypatch):
    """Of the databases that fit, build applies the one timed at the thread count it runs first, then this CPU's
    own: records tuned as one core (the session-6 Zen 3 ones) ran the shipped model 1.7x slower on two threads than
    records of the same class timed on two (tuning_logs/README.md)."""
    import dataclasses

    from compiler import threads

    _, variant, root, primary, other = _class_folders(host, lowered, tmp_path)
    _fake_log(primary, dataclasses.replace(host, device=dict(host.device, mcpu=other)), "resnet8", variant)
    _timed_at(primary, 2)
    own = _fake_log(primary.parent / f"{primary.name}@{host.device['mcpu']}", host, "resnet8", variant)
    _timed_at(own, None)  # no threads field: timed on one thread
    dirs = database.candidate_dirs(host, "resnet8", variant, root)
    assert database.best_dir(dirs, host, threads=2)[:2] == (primary, database.target_match(
        database.read_meta(primary), host)[0])
    assert database.best_dir(dirs, host, threads=1)[:2] == (own, "exact")
    assert database.best_dir(dirs, host, threads=8)[0] == primary  # nearest: 2 threads
    monkeypatch.setattr(threads, "_user_env", "2")
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert info["path"] == str(primary) and info["match"].startswith("same ISA class")
    _timed_at(own, 2)  # this CPU's records re-timed on two threads win again
    db, info = database.find_database(host, "resnet8", variant, root=root)
    assert info["path"] == str(own) and info["match"] == "exact"
    assert database.measured_threads({"sessions": [{}, {"threads": 2}]}) == 2
    assert database.measured_threads({"sessions": []}) == database.measured_threads({}) == 1


CLASS_CPUS = ("haswell", "skylake", "znver2", "znver3", "rocketlake", "icelake-server", "tigerlake", "znver4",
              "skylake-avx512")


def test_of_other_cpus_records_build_takes_the_longer_search(tmp_path, host, lowered):
    """Two databases of this CPU's class, neither tuned on this CPU, both timed at the build's thread count: build
    applies the one tuned with more trials, whichever folder it is in (on the Xeon the AVX2 code ran 0.499 ms on 2
    threads with the 2,675-trial x86-64-v3 records, 0.558 with the 1,216-trial Zen 1 ones a 2-core Zen 3 took);
    this CPU's own records still come first."""
    import dataclasses

    import targets

    cls, variant, root, primary, other = _class_folders(host, lowered, tmp_path)
    third = [c for c in CLASS_CPUS if targets.cpu_class(c) == cls and c not in (other, host.device["mcpu"])]
    if not third:
        pytest.skip(f"no third CPU of class {cls} listed")
    sibling = primary.parent / f"{primary.name}@{third[0]}"
    for directory, cpu in ((primary, other), (sibling, third[0])):
        _fake_log(directory, dataclasses.replace(host, device=dict(host.device, mcpu=cpu)), "resnet8", variant)
        _timed_at(directory, 2)
    dirs = database.candidate_dirs(host, "resnet8", variant, root)
    assert dirs.index(primary) < dirs.index(sibling)
    for longer, shorter in ((sibling, primary), (primary, sibling)):
        for directory, trials in ((longer, 2675), (shorter, 1216)):
            meta = database.read_meta(directory)
            meta["trials"] = trials
            database.write_meta(directory, meta)
        assert database.best_dir(dirs, host, threads=2)[0] == longer
    own = _fake_log(primary.parent / f"{primary.name}@{host.device['mcpu']}", host, "resnet8", variant)
    _timed_at(own, 2)  # no trials recorded: this CPU's own all the same
    dirs = database.candidate_dirs(host, "resnet8", variant, root)
    assert database.best_dir(dirs, host, threads=2)[:2] == (own, "exact")


def test_the_measuring_process_runs_tvm_with_no_thread_pinned(monkeypatch):
    """The LocalRunner's worker (the process that times every candidate) configures TVM's pool as set_tvm does: no
    thread pinned to one core, so a candidate is not timed at one core's speed when the OS puts the calling thread
    on worker 1's core (benchmarks/thread_affinity.md). TVM's default pool pins its workers; this fails with it."""
    from compiler import threads
    from compiler.tuning.session import make_runner

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least 2 cores for TVM to pin a second worker to")
    monkeypatch.setenv(threads.ENV, "2")  # what threads.for_measurement(2) sets before a local tune
    runner = make_runner(None, None, 1, 60)
    allowed = sorted(os.sched_getaffinity(0))
    got = runner.pool.submit(threads.thread_affinities).result()
    assert len(got) >= 2, got  # the worker's calling thread and TVM's second worker at least
    assert all(cores == allowed for cores in got), got
