"""The asset graph states what each step reads, every sensible selection of it can be materialized,
its checks are per run_id partition, and its assets say who owns them and what their tables hold:
through Dagster's own asset graph, and through the webserver's GraphQL as the UI sees it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, TableSchema

from pipeline_assets import defs
from pipeline_assets.checks import ALL_CHECKS, area_file_problems
from pipeline_assets.jobs import RELEASE_JOB
from pipeline_assets.local_areas import AREA_KEYS, NATIONAL_KEY
from pipeline_assets.materialize import rounded
from pipeline_assets.reuse import StepRecord
from pipeline_assets.steps import geography
from resources.files import sha256_file
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_INPUTS = {AssetKey("source_datasets"), AssetKey("calibration_package"), AssetKey("state_weights")}
NATIONAL_INPUTS = {AssetKey("source_datasets"), AssetKey("calibration_package"), AssetKey("national_weights")}
AL_01 = AssetKey(["districts", "AL_01"])
STAGES = ["policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights", "run_diagnostics",
          "model_validation"]
UNCHECKED = {"three areas"}  # the area files are verified by national_h5's all_areas_present
SELECTIONS = {
    **{stage: {AssetKey(stage)} for stage in STAGES},
    "national_h5": {NATIONAL_KEY},
    "staged_release": {AssetKey("staged_release")},
    "three areas": {AssetKey(["states", "AL"]), AL_01, AssetKey(["cities", "NYC"])},
    "a stage and two districts": {AssetKey("calibration_package"), AL_01, AssetKey(["districts", "AL_02"])},
}


def parents(key: AssetKey) -> set[AssetKey]:
    return set(defs.resolve_asset_graph().get(key).parent_keys)


def test_each_area_depends_on_what_its_fit_reads():
    for key in AREA_KEYS:
        assert parents(key) == (NATIONAL_INPUTS if key == NATIONAL_KEY else LOCAL_INPUTS), key.to_user_string()
    graph = defs.resolve_asset_graph()
    assert NATIONAL_KEY not in graph.get(AssetKey("state_weights")).child_keys
    assert AL_01 not in graph.get(AssetKey("national_weights")).child_keys


def test_staged_release_depends_on_every_area_the_diagnostics_and_the_models_check():
    assert parents(AssetKey("staged_release")) == {*AREA_KEYS, AssetKey("run_diagnostics"), AssetKey("model_validation")}
    assert parents(AssetKey("model_validation")) == {*AREA_KEYS, AssetKey("policy_data_db")}
    assert len(AREA_KEYS) == geography.AREA_COUNT + 1
    assert parents(AssetKey("promotion")) == {AssetKey("staged_release")}
    graph = defs.resolve_asset_graph()
    assert graph.get(AL_01).child_keys == {AssetKey("staged_release"), AssetKey("model_validation")}


@pytest.mark.parametrize("name", sorted(SELECTIONS))
@pytest.mark.parametrize("job_name", ["__ASSET_JOB", RELEASE_JOB])
def test_selection_resolves_to_a_job(name, job_name):
    """Dagster builds the job the UI and the CLI would run for the selection, with the selection's
    checks only (a check that cannot be subset fails this with DagsterInvalidSubsetError)."""
    job = defs.resolve_implicit_global_asset_job_def() if job_name == "__ASSET_JOB" else defs.resolve_job_def(job_name)
    subset = job.get_subset(asset_selection=SELECTIONS[name])
    assert subset.asset_layer.selected_asset_keys == SELECTIONS[name]
    checks = {check.asset_key for check in subset.asset_layer.asset_graph.asset_check_keys}
    assert checks <= SELECTIONS[name]
    assert bool(checks) == (name not in UNCHECKED)


def check_specs():
    return [spec for checks in ALL_CHECKS for spec in checks.check_specs]


def test_every_check_is_described_per_partition_and_subsettable():
    specs = check_specs()
    for spec in specs:
        assert spec.description, spec.key
        assert spec.partitions_def is not None and spec.partitions_def.name == "run_ids", spec.key
    assert all(checks.can_subset for checks in ALL_CHECKS if len(checks.check_keys) > 1)
    by_key = {(spec.asset_key.to_user_string(), spec.name): spec for spec in specs}
    assert by_key["national_h5", "all_areas_present"].blocking
    assert ("staged_release", "staged_files_verified") in by_key
    # a handful per stage and none per area: every spec is three events of every run and a status the UI polls
    assert len(specs) == 14 and not {key for key, _ in by_key} & {key.to_user_string() for key in AREA_KEYS if key != NATIONAL_KEY}


def test_blocking_area_check_gates_staged_release():
    """staged_release's step runs after the check step that holds all_areas_present."""
    job = defs.resolve_job_def(RELEASE_JOB)
    (inputs,) = [inputs for node, inputs in job.graph.dependencies.items() if node.name == "staged_release"]
    upstream = {dep.node for dependency in inputs.values() for dep in dependency.get_node_dependencies()}
    assert upstream == {"local_areas", "run_diagnostics", "model_validation", "release_integrity"}


def test_every_asset_has_owners_and_tags():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == ["team:microdata"], key
        assert node.tags.get("stage") and node.tags.get("layer") == "release", key


def test_area_descriptions_name_the_area_and_its_population_target():
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(["states", "AL"])).description.startswith("Alabama: states/AL.h5, calibrated to a population of ")
    assert graph.get(AL_01).description.startswith("Alabama's 1st congressional district: districts/AL-01.h5, calibrated to")
    assert "Alaska's at-large congressional district" in graph.get(AssetKey(["districts", "AK_01"])).description
    assert graph.get(AssetKey(["cities", "NYC"])).description.startswith("New York City")
    assert graph.get(NATIONAL_KEY).description.startswith("the United States: national/US.h5, calibrated to a population of ")
    population = geography.district_populations()["AL-01"]
    assert f"{population:,.0f}" in graph.get(AL_01).description


def schema_columns(metadata_value) -> list[str]:
    schema = metadata_value if isinstance(metadata_value, TableSchema) else metadata_value.schema
    return [column.name for column in schema.columns]


def test_column_schemas_are_the_files_headers(tiny_release):
    """Each declared schema lists exactly the columns the step writes, in its order."""
    store, meta, _ = tiny_release
    run_dir = store.path(store.run_key(meta.run_id))
    graph = defs.resolve_asset_graph()
    diagnostics = graph.get(AssetKey("run_diagnostics")).metadata
    header = lambda rel: list(pd.read_csv(run_dir / rel, nrows=0).columns)  # noqa: E731
    assert schema_columns(diagnostics["dagster/column_schema"]) == header("diagnostics/validation.csv")
    assert schema_columns(diagnostics["columns/calibration_log.csv"]) == header("diagnostics/calibration_log.csv")
    for step, log in (("state_weights", "state_calibration_log.csv"), ("national_weights", "national_calibration_log.csv")):
        assert schema_columns(graph.get(AssetKey(step)).metadata[f"columns/{log}"]) == header(f"artifacts/{log}")
    database = graph.get(AssetKey("policy_data_db")).metadata
    with sqlite3.connect(run_dir / "artifacts/policy_data.db") as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            assert schema_columns(database[f"columns/{table}"]) == columns, table
    assert sorted(name.removeprefix("columns/") for name in database if name.startswith("columns/")) == sorted(tables)
    assert schema_columns(database["dagster/column_schema"]) == schema_columns(database["columns/targets"])


def graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


EDGES = """query Edges($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode { dependencyKeys { path } dependedByKeys { path } } }
}"""


def edges(port: int, key: AssetKey) -> tuple[set[AssetKey], set[AssetKey]]:
    node = graphql(port, EDGES, {"key": {"path": list(key.path)}})["assetNodeOrError"]
    return ({AssetKey(k["path"]) for k in node["dependencyKeys"]}, {AssetKey(k["path"]) for k in node["dependedByKeys"]})


def test_webserver_shows_the_edges(tmp_path):
    """The UI's own GraphQL gives each area its three inputs and staged_release every area."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [str(ROOT / ".venv/bin/dagster-webserver"), "-m", "pipeline_assets", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                dependencies, dependents = edges(port, AL_01)
                break
            except (OSError, TypeError, KeyError):
                assert time.monotonic() < deadline, "the webserver did not answer within 180 s"
                time.sleep(1)
        assert dependencies == LOCAL_INPUTS and dependents == {AssetKey("staged_release"), AssetKey("model_validation")}
        assert edges(port, NATIONAL_KEY) == (NATIONAL_INPUTS, {AssetKey("staged_release"), AssetKey("model_validation")})
        staged_inputs, staged_outputs = edges(port, AssetKey("staged_release"))
        assert staged_inputs == {*AREA_KEYS, AssetKey("run_diagnostics"), AssetKey("model_validation")} and staged_outputs == {AssetKey("promotion")}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_loading_the_definitions_warns_nothing():
    """The partitioned checks' preview warning is silenced where they are made, and nothing else warns."""
    code = ("import warnings; from dagster import PreviewWarning; warnings.simplefilter('error', PreviewWarning); "
            "from pipeline_assets import defs; defs.resolve_job_def('release'); defs.resolve_implicit_global_asset_job_def()")
    done = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-2000:]


def test_area_file_check_reads_the_file_its_metadata_describes(tiny_release, tmp_path):
    """Passes on the run's file as recorded; fails on a wrong household count, a wrong weight sum,
    other bytes, or no file, naming the problem."""
    store, meta, _ = tiny_release
    path = store.path(store.run_key(meta.run_id, "h5s/districts/AL-01.h5"))
    record = StepRecord.model_validate_json(store.read_bytes(store.run_key(meta.run_id, "steps/local_areas.json")))
    figures = record.output_figures["h5s/districts/AL-01.h5"]
    recorded = {"path": str(path), "sha256": sha256_file(path), "households": figures["households"],
                "weight_sum": rounded(figures["weight_sum"])}
    assert area_file_problems(AL_01, recorded) == []
    for wrong in ({"households": figures["households"] + 1}, {"weight_sum": recorded["weight_sum"] * 1.01}):
        (problem,) = area_file_problems(AL_01, {**recorded, **wrong})
        assert problem.startswith("districts/AL-01.h5: " + next(iter(wrong))), problem
    copy = tmp_path / "AL-01.h5"
    copy.write_bytes(path.read_bytes() + b"\0")
    assert "expected" in area_file_problems(AL_01, {**recorded, "path": str(copy)})[0]
    assert "missing" in area_file_problems(AL_01, {**recorded, "path": str(tmp_path / "gone.h5")})[0]
    assert area_file_problems(AL_01, None) == ["districts/AL-01.h5: not materialized"]
