"""The benches run (at tiny scale, one repeat) and write their results: benches are code too, and a
change to the step functions can leave one timing nothing."""

from __future__ import annotations

import json

import pytest

import bench.common
from bench import foundation, orchestration, scaleout


@pytest.mark.parametrize("bench_module, name", [(foundation, "foundation_tiny"), (scaleout, "scaleout_tiny")])
def test_bench_writes_its_result(bench_module, name, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    bench_module.main(["--scale", "tiny", "--repeats", "1"])
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["code_sha"] and result["machine"]["cores"] >= 1
    if bench_module is scaleout:
        assert result["areas"] == 489
        # building 489 area files takes more than a moment: the bench times the work, not a lazy iterator
        assert result["one_worker_s"]["median"] > 0.5 and result["two_workers_s"]["median"] > 0.2
        assert {layout["files"] for layout in result["per_file"].values()} == {489}
        assert result["policyengine_over_entity_tables"] > 0
    else:
        assert result["step_seconds"]["state_weights"] > 0 and result["fit_step_vs_direct_l0"]["ratio"] > 0


def test_orchestration_bench_times_both_paths(tmp_path, monkeypatch):
    """On the embedded SQLite (the Postgres home differs only in its storage block, and Postgres
    runs are tested in test_production_instance.py)."""
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))  # the bench points it at its own homes
    orchestration.main(["--scale", "tiny", "--repeats", "1", "--storage", "sqlite"])
    result = json.loads((tmp_path / "orchestration_tiny.json").read_text())
    assert list(result["storages"]) == ["sqlite"]
    sqlite = result["storages"]["sqlite"]
    assert result["bare_driver_wall_s"]["median"] > 0 and sqlite["dagster_wall_s"]["median"] > 0
    assert sqlite["ratio_dagster_over_driver"] == sqlite["dagster_wall_s"]["median"] / result["bare_driver_wall_s"]["median"]
    assert "local_areas" in sqlite["per_step_overhead_s"] and 0 < sqlite["run_start_s"] < sqlite["dagster_wall_s"]["median"]
