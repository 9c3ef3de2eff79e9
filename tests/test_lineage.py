"""OpenLineage: a START and a COMPLETE or FAIL event per step, read back into openlineage-python's models."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import dataset_version_dataset, error_message_run, parent_run, tags_run
from openlineage.client.serde import Serde

from pipeline_assets import stages, step_graph
from pipeline_assets.driver import run_release
from pipeline_assets.reuse import read_record
from pipeline_assets.steps.config import config_for_scale
from resources.compute import LocalPool
from resources.git import CodeState
from resources.lineage import ENVIRONMENT_FACET, LINEAGE_DIR, Lineage, LineageSettings, RuntimeEnvironmentRunFacet, StepRun
from tests.conftest import PINNED_SHA

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
RUN_FACETS = {
    "parent": lambda body: parent_run.ParentRunFacet(run=parent_run.Run(**body["run"]), job=parent_run.Job(**body["job"])),
    "tags": lambda body: tags_run.TagsRunFacet(tags=[tags_run.TagsRunFacetFields(**tag) for tag in body["tags"]]),
    ENVIRONMENT_FACET: lambda body: RuntimeEnvironmentRunFacet(**body),
    "errorMessage": lambda body: error_message_run.ErrorMessageRunFacet(**body),
}


def _facet(build, data: dict):
    facet = build({k: v for k, v in data.items() if not k.startswith("_")})
    facet._producer = data["_producer"]
    return facet


def _datasets(kind, items: list[dict]) -> list:
    version = dataset_version_dataset.DatasetVersionDatasetFacet
    return [kind(namespace=d["namespace"], name=d["name"], facets={"version": _facet(lambda b: version(**b), d["facets"]["version"])})
            for d in items]


def parse(data: dict) -> RunEvent:
    """The event rebuilt from openlineage-python's classes (their validators check the run id and the
    time); it must serialize back to exactly what was written."""
    event = RunEvent(
        eventType=RunState(data["eventType"]),
        eventTime=data["eventTime"],
        producer=data["producer"],
        run=Run(runId=data["run"]["runId"], facets={name: _facet(RUN_FACETS[name], body) for name, body in data["run"]["facets"].items()}),
        job=Job(namespace=data["job"]["namespace"], name=data["job"]["name"]),
        inputs=_datasets(InputDataset, data["inputs"]),
        outputs=_datasets(OutputDataset, data["outputs"]),
    )
    assert Serde.to_dict(event) == data
    assert uuid.UUID(event.run.runId).version == 7
    return event


def events_of(directory) -> list[RunEvent]:
    return [parse(json.loads(path.read_bytes())) for path in sorted(directory.glob("*.json"))]


def by_step(events: list[RunEvent]) -> dict[str, dict[str, RunEvent]]:
    steps: dict[str, dict[str, RunEvent]] = {}
    for event in events:
        kinds = steps.setdefault(event.job.name.removeprefix("release."), {})
        assert event.eventType.value not in kinds, f"two {event.eventType.value} events for {event.job.name}"
        kinds[event.eventType.value] = event
    return steps


def versions(datasets) -> dict[str, str]:
    return {d.name: d.facets["version"].datasetVersion for d in datasets}


def assert_step_events(store, run_id: str, steps: dict[str, dict[str, RunEvent]], ended: str = "COMPLETE") -> None:
    """START then `ended` with one OpenLineage run id; inputs are the upstream steps' outputs, outputs
    the step's own, each with its sha256; the run's id and environment on every event."""
    for step, kinds in steps.items():
        start, end = kinds["START"], kinds[ended]
        assert start.run.runId == end.run.runId and start.job.namespace == "usdata-pipeline"
        upstream = {str(store.path(store.run_key(run_id, rel))): sha for name in stages.STEP_INPUTS[step]
                    for rel, sha in read_record(store, run_id, name).outputs.items()}
        assert versions(start.inputs) == versions(end.inputs) == upstream and start.outputs == []
        for event in (start, end):
            assert event.run.facets["tags"].tags[0].value == run_id
            environment = event.run.facets[ENVIRONMENT_FACET].environment
            assert environment["python_version"] and environment["hostname"] and environment["library_versions"]["dagster"]
        if ended == "COMPLETE":
            record = read_record(store, run_id, step)
            assert versions(end.outputs) == {str(store.path(store.run_key(run_id, rel))): sha for rel, sha in record.outputs.items()}
            assert end.run.facets[ENVIRONMENT_FACET].envId == record.env_id
    assert len({kinds["START"].run.facets["parent"].run.runId for kinds in steps.values()}) == 1


def assert_every_step_reported(store, run_id: str) -> dict[str, dict[str, RunEvent]]:
    """Each step of the run reported its START and COMPLETE, as assert_step_events requires; the
    events by step. The Dagster path's run is tests/test_dagster_release.py's end-to-end run."""
    steps = by_step(events_of(store.path(f"{LINEAGE_DIR}/{run_id}")))
    assert set(steps) == set(step_graph.STEP_ORDER) and all(set(kinds) == {"START", "COMPLETE"} for kinds in steps.values())
    assert_step_events(store, run_id, steps)
    return steps


def test_a_driver_run_reports_every_step(tiny_release):
    store, meta, _ = tiny_release
    steps = assert_every_step_reported(store, meta.run_id)
    assert len(steps["local_areas"]["COMPLETE"].outputs) == 489
    assert set(versions(steps["calibration_package"]["START"].inputs)) <= set(versions(steps["policy_data_db"]["COMPLETE"].outputs)) | set(
        versions(steps["source_datasets"]["COMPLETE"].outputs))  # the graph connects: inputs are named as outputs were


def test_a_failing_step_reports_fail_with_its_error(store):
    store, _ = store
    broken = LocalPool(2, "no-such-start-method")  # the area step cannot start its workers
    with pytest.raises(ValueError):  # new local fit settings: the local area files must be built
        run_release(store, config_for_scale("tiny", local_fit={"epochs": 40}), CODE, pool=broken, running_sha=PINNED_SHA)
    run_id = store.list_runs()[-1].run_id
    steps = by_step(events_of(store.path(f"{LINEAGE_DIR}/{run_id}")))
    assert set(steps["local_areas"]) == {"START", "FAIL"}
    assert "no-such-start-method" in steps["local_areas"]["FAIL"].run.facets["errorMessage"].message
    assert_step_events(store, run_id, {"local_areas": steps["local_areas"]}, ended="FAIL")
    assert "run_diagnostics" not in steps and all(set(steps[s]) == {"START", "COMPLETE"} for s in step_graph.STEP_ORDER[:5])


class Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict, bytes]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def collector():
    Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Collector.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_transport_sends_the_api_key_and_writes_it_nowhere(store, collector, monkeypatch, tmp_path):
    store, _ = store
    url, received = collector
    secret = "ol-ApiKeySecretValue42"
    monkeypatch.setenv("OPENLINEAGE_API_KEY", secret)
    lineage = Lineage(LineageSettings.resolve(transport="http", url=url), store.root)
    meta, _ = run_release(store, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA, lineage=lineage)

    assert len(received) == 2 * len(step_graph.STEP_ORDER)
    assert {path for path, _, _ in received} == {"/api/v1/lineage"}
    assert all(headers["Authorization"] == f"Bearer {secret}" for _, headers, _ in received)
    steps = by_step([parse(json.loads(body)) for _, _, body in received])
    assert_step_events(store, meta.run_id, steps)
    assert not store.exists(f"{LINEAGE_DIR}/{meta.run_id}")  # http only: no event files
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == [] and all(secret.encode() not in body for _, _, body in received)


def test_an_unreachable_backend_is_a_warning_not_a_failure(caplog, tmp_path):
    lineage = Lineage(LineageSettings.resolve(transport="http", url="http://127.0.0.1:9"), tmp_path)  # nothing listens
    now = datetime.now(timezone.utc)
    with caplog.at_level(logging.WARNING, logger="resources.lineage"):
        lineage.emit(StepRun("0.1.0_a1b2c3d4_20260101_000000", now, "policy_data_db", now, {}), RunState.START, {})
    assert "OpenLineage START event of 0.1.0_a1b2c3d4_20260101_000000 policy_data_db not sent" in caplog.text


def test_bad_lineage_settings_are_one_line_errors(monkeypatch):
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)
    with pytest.raises(ValueError, match="^unknown lineage transport 'kafka': expected file, http or off$"):
        LineageSettings.resolve(transport="kafka")
    with pytest.raises(ValueError, match=r"^lineage transport http needs a URL \(OPENLINEAGE_URL\)$"):
        LineageSettings.resolve(transport="http")
