"""benchmarks/pruning_table.py on the committed pruning_runs.json: keys, deltas, one table line per row, a PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "pruning_runs.json"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("pruning_table", ROOT / "benchmarks" / "pruning_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_have_the_keys_and_consistent_deltas(table):
    rows = json.loads(RUNS.read_text())["rows"]
    assert {r["source"] for r in rows} == {"published", "this project"}
    for r in rows:
        missing = [k for k in table.REQUIRED if k not in r]
        assert not missing, (r.get("id"), missing)
        if r["base_top1"] is not None and r["pruned_top1"] is not None:
            assert r["delta"] == round(r["pruned_top1"] - r["base_top1"], 2), r["id"]
        if r["source"] == "published":
            assert "Table" in r["citation"] or "table" in r["citation"], r["id"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len(table.load(RUNS)) == len(rows)


def test_generate_writes_markdown_and_png(table, tmp_path):
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    rows = table.generate(RUNS, md, png)
    text = md.read_text()
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| #", "| ---"))]
    assert len(body) == 2 * len(rows)  # the main table and the int8 table: one line per row each
    for i, r in enumerate(rows, 1):
        assert sum(ln.startswith(f"| {i} | ") for ln in body) == 2
        assert f"[^{i}]: " in text
    assert table.COMMAND in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md", "t.png"]  # no temporary files left


def test_fill_copies_a_finished_run(table, tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(RUNS.read_text())
    zoo_add = tmp_path / "zoo_add.json"
    zoo_add.write_text(json.dumps({"added": {"top1": 92.9, "top1_fp32": 92.91, "train_seconds": 6001.4}}) + "\n")
    row_id = json.loads(RUNS.read_text())["rows"][-1]["id"]
    row = table.fill(runs, row_id, zoo_add)
    assert row["pruned_top1"] == 92.91 and row["wall_s"] == 6001
    assert row["delta"] == round(92.91 - row["base_top1"], 2)
    assert table.load(runs)[-1]["pruned_top1"] == 92.91
