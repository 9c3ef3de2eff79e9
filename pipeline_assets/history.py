"""Provenance queries: list runs by any provenance field, follow a metric over time per provenance
class with excursions flagged, and say what differs between two runs.

Everything is read from the run store (meta.json, steps/*.json and the latest TRO), so the queries
work without a Dagster instance, on any copy of a store. A run is one `RunProvenance` row whose
fields have flat names, the same for filtering (`--where`), grouping (`--by`) and metrics:

    run_id, status, created_at, tro            the run
    sha, branch, dirty, diff_sha256, version   its code
    env_id, config_hash, dataset_sha256,       its identity hashes; dataset_sha256 is the sha256 of
    tro_fingerprint                            artifacts/source_datasets.h5 (the data it calibrated)
    config.<section>.<name>                    its configuration (config.local_fit.epochs)
    env.<name>                                 its runtime environment (env.library_versions.torch)
    step.<step>.<fact>                         code_version, env_id, config_hash, reuse, reused_from
    <step>.<figure>                            its metrics (state_weights.final_mean_rel_abs_error)
    input.<path>, output.<path>                sha256 of every raw input (TRO) and output (step records)
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline_assets.identity import parse_run_id
from pipeline_assets.reuse import StepRecord, read_record
from pipeline_assets.stages import ARTIFACTS
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.tro import INPUTS_ID, TroDocument, tro_revisions
from resources.files import atomic_path
from resources.run_store import SEALED, LocalRunStore, RunMeta, RunStatus, UnreadableRecord, read_model

Scalar = str | int | float | bool | None

RUN_FIELDS = ("run_id", "status", "created_at", "tro")
CODE_FIELDS = ("sha", "branch", "dirty", "diff_sha256", "version")
IDENTITY_FIELDS = ("env_id", "config_hash", "dataset_sha256", "tro_fingerprint")
# A class in the asset check's sense: runs that computed from the same configuration and data.
CLASS_FIELDS = ("config_hash", "dataset_sha256")
STEP_FACTS = ("code_version", "env_id", "config_hash", "reuse", "reused_from")
DATASET_FILE = ARTIFACTS["source_datasets"]
# A run's environment where its steps disagree (they ran on different machines): the values, joined.
MIXED_SEPARATOR = " | "

log = logging.getLogger(__name__)


def flatten(payload: dict, prefix: str = "") -> dict[str, Scalar]:
    """Nested dicts as dotted names; lists as JSON text (so every value is one comparable scalar)."""
    flat: dict[str, Scalar] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def render(value: Scalar) -> str:
    """A value as text, what filters match and tables show (null/true/false spelled as in JSON)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


class RunProvenance(BaseModel):
    """One run's provenance, read from the store (see the module docstring for the field names)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    status: RunStatus
    created_at: datetime
    tro: str | None  # the latest TRO revision's file name; None until the run completes
    sha: str
    branch: str | None
    dirty: bool
    diff_sha256: str | None
    version: str
    env_id: str | None
    config_hash: str | None
    dataset_sha256: str | None
    tro_fingerprint: str | None
    config: dict[str, Scalar]  # "local_fit.epochs" -> 20
    env: dict[str, Scalar]  # "library_versions.torch" -> "2.13.0+cpu"
    steps: dict[str, Scalar]  # "state_weights.reuse" -> "reused"
    metrics: dict[str, float | int]  # "state_weights.final_mean_rel_abs_error" -> 0.31
    inputs: dict[str, str]  # raw input path -> sha256
    outputs: dict[str, str]  # path in the run directory -> sha256

    def _core(self, names: Sequence[str]) -> dict[str, Scalar]:
        return self.model_dump(mode="json", include=set(names))

    def _step_facts(self, *facts: str) -> dict[str, Scalar]:
        return {f"step.{name}": value for name, value in self.steps.items() if name.rsplit(".", 1)[1] in facts}

    def sections(self) -> dict[str, dict[str, Scalar]]:
        """The fields a comparison looks at, by what they describe. The run's name, status, time
        and how its steps got their files (reuse) are not differences between two runs' contents."""
        return {
            "code": self._core(CODE_FIELDS) | self._step_facts("code_version"),
            "environment": {f"env.{name}": value for name, value in self.env.items()},
            "configuration": {f"config.{name}": value for name, value in self.config.items()},
            "identity": self._core(IDENTITY_FIELDS) | self._step_facts("env_id", "config_hash"),
            "inputs": {f"input.{path}": digest for path, digest in self.inputs.items()},
            "outputs": {f"output.{path}": digest for path, digest in self.outputs.items()},
            "metrics": dict(self.metrics),
        }

    def fields(self) -> dict[str, Scalar]:
        """Every field by its flat name: what --where filters, --by groups and a metric names."""
        flat = self._core(RUN_FIELDS) | self._step_facts("reuse", "reused_from")
        for section in self.sections().values():
            flat |= section
        return flat


def run_environment(records: Iterable[StepRecord]) -> dict[str, Scalar]:
    """The run's environment, flattened: each field's value where every step recorded the same one,
    else the distinct values in step order joined by MIXED_SEPARATOR."""
    seen: dict[str, list[Scalar]] = {}
    for record in records:
        for name, value in flatten(record.environment).items():
            values = seen.setdefault(name, [])
            if value not in values:
                values.append(value)
    return {
        name: values[0] if len(values) == 1 else MIXED_SEPARATOR.join(map(render, values))
        for name, values in seen.items()
    }


def tro_facts(path: Path) -> tuple[dict[str, str], str]:
    """(raw input path -> sha256, composition fingerprint) from a TRO (UnreadableRecord naming it if it is not one)."""
    tro = read_model(path, TroDocument).graph[0]
    hashes = {artifact.id: artifact.hash.value for artifact in tro.composition.artifacts}
    inputs = next((arrangement.locations for arrangement in tro.arrangements if arrangement.id == INPUTS_ID), [])
    return {location.path: hashes[location.artifact.id] for location in inputs}, tro.composition.fingerprint.hash.value


def read_run(store: LocalRunStore, meta: RunMeta) -> RunProvenance:
    """A run's provenance row from its meta.json, step records and latest TRO."""
    records = [record for step in STEP_ORDER if (record := read_record(store, meta.run_id, step)) is not None]
    revisions = tro_revisions(store, meta.run_id)
    inputs, fingerprint = tro_facts(revisions[-1]) if revisions else ({}, None)
    return RunProvenance(
        run_id=meta.run_id,
        status=meta.status,
        created_at=meta.created_at,
        tro=revisions[-1].name if revisions else None,
        sha=meta.sha,
        branch=meta.branch,
        dirty=meta.dirty,
        diff_sha256=meta.diff_sha256,
        version=meta.version,
        env_id=meta.env_id,
        config_hash=meta.config_hash,
        dataset_sha256=next((r.outputs.get(DATASET_FILE) for r in records if r.step == "source_datasets"), None),
        tro_fingerprint=fingerprint,
        config=flatten(meta.config),
        env=run_environment(records),
        steps={f"{r.step}.{fact}": getattr(r, fact) for r in records for fact in STEP_FACTS},
        metrics={f"{r.step}.{name}": value for r in records for name, value in r.figures.items()},
        inputs=inputs,
        outputs={path: digest for r in records for path, digest in r.outputs.items()},
    )


def read_provenance(store: LocalRunStore, run_id: str) -> RunProvenance:
    """One run's row; a malformed or unknown run_id is a one-line error (InvalidRunId, RunStoreError)."""
    parse_run_id(run_id)
    return read_run(store, store.read_meta(run_id))


# --- filtering -----------------------------------------------------------------------------------
def known_fields(rows: Iterable[RunProvenance]) -> set[str]:
    """The fields of any run (and the run-level ones even when there is no run)."""
    return set(RUN_FIELDS + CODE_FIELDS + IDENTITY_FIELDS).union(*(row.fields() for row in rows))


def require_fields(rows: Sequence[RunProvenance], names: Iterable[str], kind: str = "field") -> None:
    """Refuse, in one line, a field no run has: the closest names, and the families that exist."""
    known = known_fields(rows)
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=3)
        families = sorted({field.split(".")[0] + (".*" if "." in field else "") for field in known})
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown {kind} {name!r}: {hint}fields are {', '.join(families)}")


def parse_filter(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name:
        raise ValueError(f"filter {text!r} is not FIELD=VALUE")
    return name, pattern


def select(rows: Sequence[RunProvenance], filters: Sequence[str]) -> list[RunProvenance]:
    """The rows whose every FIELD=VALUE filter matches; VALUE is a glob (sha=a1b2c3d4*), compared
    with the field's text (`render`), and a run without the field does not match."""
    parsed = [parse_filter(text) for text in filters]
    require_fields(rows, [name for name, _ in parsed])

    def matches(row: RunProvenance) -> bool:
        fields = row.fields()
        return all(name in fields and fnmatch.fnmatchcase(render(fields[name]), pattern) for name, pattern in parsed)

    return [row for row in rows if matches(row)]


def read_runs(store: LocalRunStore, metas: Iterable[RunMeta]) -> list[RunProvenance]:
    """The rows of `metas`. A run with an unreadable record (a step record, its TRO) affects only
    itself: it is left out, with one warning naming the file and what is wrong."""
    rows = []
    for meta in metas:
        try:
            rows.append(read_run(store, meta))
        except UnreadableRecord as exc:
            log.warning(str(exc))
    return rows


def list_runs(store: LocalRunStore, filters: Sequence[str] = ()) -> list[RunProvenance]:
    """Every readable run of the store, oldest first, narrowed by FIELD=VALUE filters (see `select`)."""
    return select(read_runs(store, store.list_runs()), filters)


# --- timeline ------------------------------------------------------------------------------------
def against_history(
    value: float, history: Sequence[float], factor: float, higher_is_better: bool = False
) -> tuple[float | None, bool]:
    """(median of `history`, whether `value` is worse than it by more than `factor`); no history,
    no excursion. The history's median, not its mean: one earlier excursion must not hide the next."""
    if not history:
        return None, False
    median = statistics.median(history)
    return median, (value * factor < median) if higher_is_better else (value > factor * median)


class TimelinePoint(BaseModel):
    run_id: str
    created_at: datetime
    status: RunStatus
    value: float
    others_median: float | None  # the median of the class's other runs; None when it has none
    excursion: bool


class ProvenanceClass(BaseModel):
    key: dict[str, str]  # each --by field -> its value (as text)
    median: float
    points: list[TimelinePoint]  # oldest first

    def label(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.key.items())


class Timeline(BaseModel):
    metric: str
    by: list[str]
    factor: float
    higher_is_better: bool
    classes: list[ProvenanceClass]
    without_metric: list[str]  # runs with no value of the metric (not finished, or the step failed)

    def excursions(self) -> list[TimelinePoint]:
        return [point for cls in self.classes for point in cls.points if point.excursion]


def metric_value(fields: dict[str, Scalar], metric: str) -> float | None:
    """A run's value of `metric`; a field that is not a number is refused."""
    value = fields.get(metric)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"field {metric!r} is not a number (run {fields['run_id']} has {render(value)!r})")
    return value


def timeline(
    rows: Sequence[RunProvenance], metric: str, by: Sequence[str], factor: float = 1.5, higher_is_better: bool = False
) -> Timeline:
    """`metric` over time in each provenance class (the runs that agree on every `by` field).

    A run is an excursion when it is worse than the median of its class's other runs (earlier and
    later: leaving the run itself out keeps one bad run from raising the bar it is judged by) by more
    than `factor` (> 1). Lower is better unless `higher_is_better`.
    """
    if not factor > 1:
        raise ValueError(f"factor {factor} must be greater than 1")
    if not by:
        raise ValueError("group by at least one field")
    require_fields(rows, [metric], "metric")
    require_fields(rows, by)
    members: dict[tuple[str, ...], list[tuple[RunProvenance, float]]] = {}
    without_metric = []
    for row in sorted(rows, key=lambda r: (r.created_at, r.run_id)):
        fields = row.fields()
        value = metric_value(fields, metric)
        if value is None:
            without_metric.append(row.run_id)
            continue
        members.setdefault(tuple(render(fields.get(name)) for name in by), []).append((row, float(value)))
    classes = []
    for key, runs in members.items():
        values = [value for _, value in runs]
        points = []
        for index, (row, value) in enumerate(runs):
            median, worse = against_history(value, values[:index] + values[index + 1:], factor, higher_is_better)
            points.append(TimelinePoint(run_id=row.run_id, created_at=row.created_at, status=row.status,
                                        value=value, others_median=median, excursion=worse))
        classes.append(ProvenanceClass(key=dict(zip(by, key)), median=statistics.median(values), points=points))
    return Timeline(metric=metric, by=list(by), factor=factor, higher_is_better=higher_is_better,
                    classes=classes, without_metric=without_metric)


def plot_timeline(result: Timeline, path: Path) -> Path:
    """A PNG: one line per class in time order, excursions circled in red."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(10, 5))
    for cls in result.classes:
        times = [point.created_at for point in cls.points]
        axes.plot(times, [point.value for point in cls.points], marker="o", label=cls.label())
    flagged = result.excursions()
    if flagged:
        axes.scatter([p.created_at for p in flagged], [p.value for p in flagged], s=160, facecolors="none",
                     edgecolors="red", linewidths=2, label=f"excursion (> {result.factor:g} x class median)", zorder=3)
    axes.set_title(f"{result.metric} by {', '.join(result.by)}")
    axes.set_xlabel("run created (UTC)")
    axes.set_ylabel(result.metric)
    axes.legend(fontsize="small")
    figure.autofmt_xdate()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    pyplot.close(figure)
    return path


# --- the asset check's question: is this run worse than its class's history? ------------------
class HistoryVerdict(BaseModel):
    run_id: str
    metric: str
    value: float
    factor: float
    history: list[str]  # the sealed runs of the same class it was compared with
    class_median: float | None
    excursion: bool

    def summary(self) -> str:
        if self.class_median is None:
            return f"{self.metric} {self.value:.6g}: no completed run of this class to compare with"
        verdict = "EXCURSION" if self.excursion else "within"
        return (f"{self.metric} {self.value:.6g} vs class median {self.class_median:.6g} over "
                f"{len(self.history)} run(s): {verdict} (factor {self.factor:g})")


def class_history(store: LocalRunStore, run: RunProvenance) -> list[RunProvenance]:
    """The completed (or promoted) runs of `run`'s class (same config_hash and dataset), not itself.
    meta.json narrows by config_hash first, so only candidates' records are read."""
    candidates = [
        meta for meta in store.list_runs()
        if meta.run_id != run.run_id and meta.status in SEALED and meta.config_hash == run.config_hash
    ]
    rows = read_runs(store, candidates)
    return [row for row in rows if all(getattr(row, name) == getattr(run, name) for name in CLASS_FIELDS)]


def history_verdict(run: RunProvenance, history: Sequence[RunProvenance], metric: str, factor: float) -> HistoryVerdict:
    """Whether `run`'s `metric` (lower is better) exceeds `factor` x the median of `history`'s."""
    if metric not in run.metrics:
        raise ValueError(f"run {run.run_id} has no {metric}")
    compared = [row for row in history if metric in row.metrics]
    value = float(run.metrics[metric])
    median, worse = against_history(value, [row.metrics[metric] for row in compared], factor)
    return HistoryVerdict(run_id=run.run_id, metric=metric, value=value, factor=factor,
                          history=[row.run_id for row in compared], class_median=median, excursion=worse)


# --- compare -------------------------------------------------------------------------------------
class Difference(BaseModel):
    field: str
    a: Scalar
    b: Scalar


class Comparison(BaseModel):
    run_a: str
    run_b: str
    sections: dict[str, list[Difference]]  # code, environment, configuration, identity, inputs, outputs, metrics

    def same(self) -> bool:
        return not any(self.sections.values())


def compare(a: RunProvenance, b: RunProvenance) -> Comparison:
    """Every field whose value differs between the two runs (absent in one run: null), by section."""
    sections = {}
    for (name, fields_a), fields_b in zip(a.sections().items(), b.sections().values()):
        names = sorted(fields_a.keys() | fields_b.keys())
        sections[name] = [
            Difference(field=field, a=fields_a.get(field), b=fields_b.get(field))
            for field in names if fields_a.get(field) != fields_b.get(field)
        ]
    return Comparison(run_a=a.run_id, run_b=b.run_id, sections=sections)
