"""Provenance queries over a history of six real tiny runs in two classes, with one planted excursion
and one planted library version: listing and filtering, the timeline, the class-history asset check
(through Dagster), compare, and the command line's outputs and one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from dagster import AssetCheckSeverity, AssetKey, instance_for_test
from dagster._core.events import DagsterEventType

from pipeline_assets import defs
from pipeline_assets.checks import ALL_CHECKS, failing_checks
from pipeline_assets.cli import main
from pipeline_assets.driver import run_release
from pipeline_assets.history import Difference, class_history, compare, history_verdict, list_runs, read_provenance, timeline
from pipeline_assets.identity_contract import env_id
from pipeline_assets.jobs import job_run_config
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.reuse import StepRecord, read_record, record_key
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus
from resources.runtime import RuntimeEnvironment
from tests.conftest import PINNED_SHA

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
METRIC = "state_weights.final_mean_rel_abs_error"
CHECK = "calibration_error_vs_class_history"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLANTED_TORCH = "2.99.0-planted"
# Few epochs keep the six runs cheap (the runs after the first reuse everything but the fit they
# change and the area files). The absolute thresholds are loose so that the planted excursion trips
# only the history check, not the blocking calibration_quality check.
LOOSE = {"max_mean_rel_abs_error": 5.0}
CLASS_A = config_for_scale("tiny", local_fit={"epochs": 20}, national_fit={"epochs": 20}, quality=LOOSE)
CLASS_B = config_for_scale("tiny", local_fit={"epochs": 30}, national_fit={"epochs": 20}, quality=LOOSE)


@dataclass
class History:
    store: LocalRunStore
    a: list[str]  # class A's run_ids, oldest first
    b: list[str]
    excursion: str  # a[1], its state fit error planted three times higher
    torch_changed: str  # b[0], its recorded torch version planted


def rewrite_record(store: LocalRunStore, run_id: str, record: StepRecord) -> None:
    """Plant a change in a completed run's record (the store refuses to rewrite a sealed run's files)."""
    store.path(store.run_key(run_id, record_key(record.step))).write_text(record.model_dump_json(indent=2))


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    store = LocalRunStore(tmp_path_factory.mktemp("history_store"))
    runs = [run_release(store, config, CODE, running_sha=PINNED_SHA)[0].run_id for config in (CLASS_A, CLASS_B) * 3]
    a, b = runs[0::2], runs[1::2]
    # The planted excursion: the second class-A run's recorded fit error, three times the real one
    # (after all runs, so no later run reuses the planted figures).
    fit = read_record(store, a[1], "state_weights")
    planted = {**fit.figures, "final_mean_rel_abs_error": 3 * fit.figures["final_mean_rel_abs_error"]}
    rewrite_record(store, a[1], fit.model_copy(update={"figures": planted}))
    # The planted library version: every step of b[0] recorded another torch, and so another env_id
    # (what a run in another environment would have recorded).
    for step in STEP_ORDER:
        record = read_record(store, b[0], step)
        environment = {**record.environment, "library_versions": {**record.environment["library_versions"], "torch": PLANTED_TORCH}}
        planted_env_id = env_id(RuntimeEnvironment.model_validate(environment))
        rewrite_record(store, b[0], record.model_copy(update={"environment": environment, "env_id": planted_env_id}))
    store.update_meta(b[0], lambda meta: setattr(meta, "env_id", planted_env_id))
    return History(store=store, a=a, b=b, excursion=a[1], torch_changed=b[0])


@pytest.fixture
def cli_store(history, monkeypatch):
    monkeypatch.setenv("PIPELINE_STORE", str(history.store.root))
    return history


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("usdata-pipeline: error: ") and "\n" not in err, err
    return err


def test_rows_carry_meta_step_records_and_tro(history):
    rows = list_runs(history.store)
    assert [row.run_id for row in rows] == sorted(history.a + history.b)
    dataset = read_record(history.store, history.a[0], "source_datasets").outputs["artifacts/source_datasets.h5"]
    for row in rows:
        assert row.status is RunStatus.completed and row.tro == "trace.tro.jsonld" and row.tro_fingerprint
        assert row.dataset_sha256 == dataset
        assert row.inputs and all(path.startswith("raw_inputs/") for path in row.inputs)
        weights = "artifacts/state_weights.npy"
        assert row.outputs[weights] == read_record(history.store, row.run_id, "state_weights").outputs[weights]
        fields = row.fields()
        assert fields["config.local_fit.epochs"] in (20, 30) and fields["env.python_version"]
        assert fields["step.state_weights.reuse"] in ("computed", "reused") and isinstance(fields[METRIC], float)
    torch = {row.run_id: row.fields()["env.library_versions.torch"] for row in rows}
    assert [run_id for run_id, version in torch.items() if version == PLANTED_TORCH] == [history.torch_changed]


def test_filters_on_any_field(history):
    def ids(*filters: str) -> list[str]:
        return [row.run_id for row in list_runs(history.store, filters)]

    assert ids("config.local_fit.epochs=30") == history.b
    assert ids(f"sha={PINNED_SHA[:8]}*", "status=completed") == sorted(history.a + history.b)
    assert ids("step.state_weights.reuse=reused") == sorted(history.a[1:] + history.b[1:])
    assert ids("config.local_fit.epochs=20", "step.state_weights.reuse=computed") == history.a[:1]
    assert ids(f"env.library_versions.torch={PLANTED_TORCH}") == [history.torch_changed]
    with pytest.raises(ValueError, match=r"unknown field 'config.local_fit.epoch': did you mean config.local_fit.epochs"):
        list_runs(history.store, ["config.local_fit.epoch=20"])
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        list_runs(history.store, ["epochs"])


def test_timeline_groups_the_classes_and_flags_exactly_the_planted_run(history):
    rows = list_runs(history.store)
    for by in (["config_hash"], ["config_hash", "dataset_sha256"]):
        result = timeline(rows, METRIC, by, factor=1.5)
        assert [[point.run_id for point in cls.points] for cls in result.classes] == [history.a, history.b]
        assert [point.run_id for point in result.excursions()] == [history.excursion]
        assert result.without_metric == []
    planted = result.classes[0].points[1]
    assert planted.others_median == pytest.approx(planted.value / 3)
    assert history.excursion not in {p.run_id for p in timeline(rows, METRIC, ["config_hash"], higher_is_better=True).excursions()}


def test_class_history_verdict(history):
    store = history.store

    def verdict(run_id: str):
        run = read_provenance(store, run_id)
        return history_verdict(run, class_history(store, run), METRIC, 1.5)

    verdicts = {run_id: verdict(run_id) for run_id in history.a + history.b}
    assert [run_id for run_id, verdict in verdicts.items() if verdict.excursion] == [history.excursion]
    assert verdicts[history.excursion].history == [history.a[0], history.a[2]]  # same config_hash and dataset
    alone = history_verdict(read_provenance(store, history.a[0]), [], METRIC, 1.5)
    assert not alone.excursion and alone.class_median is None and "no completed run" in alone.summary()


def test_check_warns_on_the_excursion_without_failing_the_run(history):
    """Re-materializing a completed run's fit keeps its recorded (here planted) result and runs the
    fit's checks on it: the real check, evaluated by Dagster, on the run store's history."""
    spec = next(spec for c in ALL_CHECKS for spec in c.check_specs
                if spec.key.name == CHECK and spec.asset_key == AssetKey("state_weights"))
    assert spec.blocking is False
    job = defs.resolve_job_def("release")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [history.excursion, history.a[0]])
        evaluations = {}
        for run_id in (history.excursion, history.a[0]):
            result = job.execute_in_process(
                partition_key=run_id, instance=instance, asset_selection=[AssetKey("state_weights")],
                run_config=job_run_config(history.store, PINNED_SHA), raise_on_error=False,
            )
            assert result.success, run_id
            checks = [e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
            assert failing_checks(checks) == [], run_id  # a warning does not fail a run
            evaluations[run_id] = next(check for check in checks if check.check_name == CHECK)
    warned, normal = evaluations[history.excursion], evaluations[history.a[0]]
    assert not warned.passed and warned.severity == AssetCheckSeverity.WARN
    assert warned.metadata["history_runs"].value == 2 and "EXCURSION" in warned.description
    assert normal.passed and normal.metadata["history_runs"].value == 2


def test_compare_names_exactly_the_planted_differences(history):
    store, a, b = history.store, history.a[0], history.torch_changed
    row_a, row_b = read_provenance(store, a), read_provenance(store, b)
    sections = compare(row_a, row_b).sections
    assert sections["configuration"] == [Difference(field="config.local_fit.epochs", a=20, b=30)]
    assert sections["environment"] == [
        Difference(field="env.library_versions.torch", a=row_a.env["library_versions.torch"], b=PLANTED_TORCH)
    ]
    assert sections["code"] == [] and sections["inputs"] == []
    # What follows from them: the identity hashes, the state fit's files and everything built from
    # them, and the metrics of the state fit and the diagnostics; not the datasets nor the national fit.
    assert {d.field for d in sections["identity"]} == {
        "config_hash", "env_id", "tro_fingerprint", "step.state_weights.config_hash", *(f"step.{s}.env_id" for s in STEP_ORDER)
    }
    outputs = {d.field for d in sections["outputs"]}
    assert "output.artifacts/state_weights.npy" in outputs and "output.h5s/states/AL.h5" in outputs
    assert not outputs & {"output.artifacts/source_datasets.h5", "output.artifacts/national_weights.npy"}
    assert {d.field.split(".")[0] for d in sections["metrics"]} == {"state_weights", "run_diagnostics"}


def test_compare_command(cli_store, capsys):
    a, b = cli_store.a[0], cli_store.torch_changed
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "config.local_fit.epochs: 20 -> 30" in out and f"-> {PLANTED_TORCH}" in out and "code: same" in out
    assert main(["compare", a, b, "--format", "json"]) == 0
    sections = json.loads(capsys.readouterr().out)["sections"]
    assert [d["field"] for d in sections["environment"]] == ["env.library_versions.torch"]


def test_runs_command(cli_store, capsys):
    assert main(["runs", "--where", "config.local_fit.epochs=30", "--fields", "config.local_fit.epochs," + METRIC]) == 0
    out = capsys.readouterr().out
    assert all(run_id in out for run_id in cli_store.b) and not any(run_id in out for run_id in cli_store.a)
    assert METRIC in out.splitlines()[0] and "3 run(s)" in out
    assert main(["runs", "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 6 and all("env.library_versions.torch" in run and METRIC in run for run in runs)


def test_timeline_command_table_json_and_png(cli_store, capsys, tmp_path):
    timeline_args = ["timeline", METRIC, "--by", "config_hash"]
    assert main(timeline_args) == 0
    out = capsys.readouterr().out
    assert out.count("EXCURSION") == 1 and f"1 excursion(s): {cli_store.excursion}" in out
    assert main([*timeline_args, "--format", "json"]) == 0
    captured = capsys.readouterr()
    classes = json.loads(captured.out)["classes"]
    assert [[p["run_id"] for p in cls["points"] if p["excursion"]] for cls in classes] == [[cli_store.excursion], []]
    png = tmp_path / "timeline.png"
    assert main([*timeline_args, "--format", "png", "--output", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert main([*timeline_args, "--fail-on-excursion"]) == 1
    assert main([*timeline_args, "--factor", "5", "--fail-on-excursion"]) == 0


PNG = ["--format", "png", "--output", "{tmp}/t.png"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["timeline", "state_weights.final_mean_rel_abs_err", "--by", "config_hash", *PNG],
         f"unknown metric 'state_weights.final_mean_rel_abs_err': did you mean {METRIC}"),
        (["timeline", METRIC, "--by", "config_hsh", *PNG], "unknown field 'config_hsh'"),
        (["timeline", "status", "--by", "config_hash", *PNG], "field 'status' is not a number"),
        (["timeline", METRIC, "--by", "config_hash", "--factor", "1", *PNG], "factor 1.0 must be greater than 1"),
        (["timeline", METRIC, "--by", "config_hash", "--factor", "big", *PNG], "invalid float value: 'big'"),
        (["timeline", METRIC, "--by", "config_hash,", *PNG], "'config_hash,' is not FIELD[,FIELD]"),
        (["timeline", METRIC, "--by", "config_hash", "--output", "{tmp}/t.png"], "--output is for --format png"),
        (["runs", "--where", "config.local_fit.epoch=20"], "did you mean config.local_fit.epochs"),
        (["runs", "--where", "epochs"], "filter 'epochs' is not FIELD=VALUE"),
        (["runs", "--fields", "nothing.like.this"], "unknown field 'nothing.like.this'"),
        (["compare", "latest", "{a}"], "malformed run_id 'latest'"),
        (["compare", "{a}", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli_store, capsys, tmp_path, argv, fragment):
    assert main([arg.format(tmp=tmp_path, a=cli_store.a[0]) for arg in argv]) == 2
    assert fragment in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []
