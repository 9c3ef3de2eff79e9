"""The stages of one release, bound to the run store: where each step reads and writes, what its
code version, configuration and inputs are, and whether an earlier run's output can be reused.

The bare driver and the Dagster assets both call `execute_step` / `execute_areas`, so the layout of
a run, the order of its steps and the reuse rule are written once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Callable, Generator, Iterator

from pipeline_assets.code_versions import code_version
from pipeline_assets.identity_contract import env_id, hashed_config, step_config_hash
from pipeline_assets.reuse import (
    StepRecord,
    find_reusable,
    find_reusable_part,
    hash_outputs,
    link_outputs,
    next_rebuild_name,
    read_record,
    reuse_key,
    verifies,
    write_record,
)
from pipeline_assets.step_graph import STEP_INPUTS, STEP_ORDER
from pipeline_assets.steps import database, datasets, geography, uprating
from pipeline_assets.steps.calibration import build_calibration_package
from pipeline_assets.steps.config import FitConfig, RunConfig
from pipeline_assets.steps.database import build_database
from pipeline_assets.steps.datasets import build_datasets
from pipeline_assets.steps.diagnostics import write_diagnostics
from pipeline_assets.steps.local_areas import AreaResult, build_area_h5, load_area_inputs
from pipeline_assets.steps.model_validation import ModelEnvironmentInfo, ModelFigures, sampled, validate_with_model
from pipeline_assets.steps.results import StepResult
from pipeline_assets.tro import SealedRunLender
from resources.compute import LocalPool
from resources.files import atomic_path
from resources.run_store import SEALED, LocalRunStore, RunStoreError, utcnow
from resources.runtime import RuntimeEnvironment

ARTIFACTS = {
    "policy_data_db": "artifacts/policy_data.db",
    "source_datasets": "artifacts/source_datasets.h5",
    "calibration_package": "artifacts/calibration_package.h5",
    "state_weights": "artifacts/state_weights.npy",
    "national_weights": "artifacts/national_weights.npy",
    "state_calibration_log": "artifacts/state_calibration_log.csv",
    "national_calibration_log": "artifacts/national_calibration_log.csv",
}
H5_ROOT = "h5s"
DIAGNOSTICS = "diagnostics"
# The area files are two independent parts, each reused on its own (same code, environment and the
# inputs it reads): the 488 local areas read the state weights, the national file the national ones.
AREA_PART_INPUTS = {
    "local": ("source_datasets", "calibration_package", "state_weights"),
    "national": ("source_datasets", "calibration_package", "national_weights"),
}


def artifact(store: LocalRunStore, run_id: str, name: str) -> Path:
    """Existing input artifact of a run (read side)."""
    return store.path(store.run_key(run_id, ARTIFACTS[name]))


def output(store: LocalRunStore, run_id: str, name: str) -> Path:
    return store.output_path(run_id, ARTIFACTS[name])


def run_database(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    """Build the database from the raw inputs, or (--reuse-database) take the newest completed run's."""
    if config.build_database:
        return build_database(output(store, run_id, "policy_data_db"), config.database)
    return reuse_database(store, run_id)


def reuse_database(store: LocalRunStore, run_id: str) -> StepResult:
    """Copy the policy_data.db of the newest sealed run whose TRO vouches for it."""
    lender = SealedRunLender(store)
    sealed = [m.run_id for m in reversed(store.list_runs()) if m.status in SEALED and m.run_id != run_id]
    source = next((source for source in sealed if (record := read_record(store, source, "policy_data_db"))
                   and lender.lends(source, record.outputs)), None)
    if source is None:
        raise FileNotFoundError(
            f"--reuse-database: no completed run in {store.root} has a policy_data.db that verifies against its TRO; "
            "build one with --build-database"
        )
    target = output(store, run_id, "policy_data_db")
    with atomic_path(target) as tmp:
        shutil.copyfile(artifact(store, source, "policy_data_db"), tmp)
    return StepResult(outputs={"database": target}, figures={"reused": 1}, reused_from=source)


def run_datasets(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    return build_datasets(output(store, run_id, "source_datasets"), config.dataset)


def run_calibration_package(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    return build_calibration_package(
        artifact(store, run_id, "policy_data_db"),
        artifact(store, run_id, "source_datasets"),
        output(store, run_id, "calibration_package"),
        config.calibration,
    )


def fit_config(config: RunConfig, step: str) -> FitConfig:
    return config.local_fit if STEPS[step].fit_scope == "local" else config.national_fit


def fit_on_compute(step: str, log_name: str):
    """The runner of one scope's fit: on the compute resource (the local process, or a remote GPU)."""
    def run_fit(store: LocalRunStore, run_id: str, config: RunConfig, compute) -> StepResult:
        from pipeline_assets.steps.weights import fit_weights  # torch is imported only where a fit runs

        return compute.fit(fit_weights, artifact(store, run_id, "calibration_package"), output(store, run_id, step),
                           output(store, run_id, log_name), fit_config(config, step))
    return run_fit


def wanted_areas(area_codes: set[str] | None) -> list:
    wanted = [*geography.areas(), geography.NATIONAL]
    return wanted if area_codes is None else [area for area in wanted if area.code in area_codes]


AREAS_BY_PATH = {f"{H5_ROOT}/{area.relpath}": area for area in wanted_areas(None)}
AREA_FIGURES = ("size_bytes", "households", "weight_sum", "population")  # kept per file, for reuse


def area_part(area: geography.Area) -> str:
    return "national" if area.kind == "national" else "local"


AREA_PATHS_BY_PART = {part: [rel for rel, area in AREAS_BY_PATH.items() if area_part(area) == part] for part in AREA_PART_INPUTS}


def build_areas(store: LocalRunStore, run_id: str, pool: LocalPool, areas: list, out_root: Path) -> Iterator[AreaResult]:
    loader_args = tuple(artifact(store, run_id, name) for name in STEP_INPUTS["local_areas"])
    return pool.iter_with_inputs(build_area_h5, areas, load_area_inputs, loader_args, out_root)


def run_local_areas(
    store: LocalRunStore, run_id: str, pool: LocalPool, area_codes: set[str] | None = None
) -> Iterator[AreaResult]:
    """Build the 488 area files plus national (or the subset `area_codes`) on the worker pool,
    each result as its file is written."""
    wanted = wanted_areas(area_codes)
    for area in wanted:
        store.output_path(run_id, f"{H5_ROOT}/{area.relpath}")  # refuses to rewrite a sealed run's file
    return build_areas(store, run_id, pool, wanted, store.path(store.run_key(run_id, H5_ROOT)))


def rebuild_sealed_areas(
    store: LocalRunStore, run_id: str, pool: LocalPool, area_codes: set[str] | None
) -> list[AreaResult]:
    """Rebuild areas of a completed run (a backfill) without rewriting anything it published.

    The areas are built aside; each must come out byte-identical to the file the run holds (same
    code, inputs and seeds), which then stays untouched. A file that would differ is refused: a
    completed run is append-only, so a different result belongs in a new run.
    """
    aside = store.path(store.run_key(run_id, f".rebuild-{utcnow():%Y%m%d%H%M%S%f}"))
    try:
        results = list(build_areas(store, run_id, pool, wanted_areas(area_codes), aside))
        recorded = read_record(store, run_id, "local_areas").outputs
        changed = [r.relpath for r in results if recorded.get(f"{H5_ROOT}/{r.relpath}") != r.sha256]
        if changed:
            raise RunStoreError(
                f"rebuilding {len(changed)} area(s) of completed run {run_id} gives other bytes "
                f"(e.g. {changed[0]}); a completed run is append-only: start a new run"
            )
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return results


def run_diagnostics(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    out_dir = store.output_path(run_id, DIAGNOSTICS)
    return write_diagnostics(
        artifact(store, run_id, "calibration_package"),
        artifact(store, run_id, "state_weights"),
        artifact(store, run_id, "national_weights"),
        {
            "local": artifact(store, run_id, "state_calibration_log"),
            "national": artifact(store, run_id, "national_calibration_log"),
        },
        hashed_config(config),  # what determines the results: labels, sizes and the reuse switch aside
        out_dir,
    )


def model_on(compute):
    """The model run by `compute` (local runners of the model's environment, or Modal's model image),
    as the model validation takes it."""
    def run_model(paths: list[Path], period: int) -> tuple[ModelEnvironmentInfo, list[ModelFigures]]:
        run = compute.run_model(paths, period)
        environment = ModelEnvironmentInfo(env_id=run.env_id, ran_on=run.ran_on, libraries={
            name: version for name, version in run.library_versions.items() if version})
        return environment, [ModelFigures.model_validate(area) for area in run.areas]
    return run_model


def run_model_validation(store: LocalRunStore, run_id: str, config: RunConfig, compute) -> StepResult:
    """PolicyEngine-US on the configured sample of this run's area files, on the compute resource."""
    settings = config.model_validation
    wanted = {area.code: area for area in wanted_areas(None)}
    codes = sampled(settings.areas, list(wanted))
    areas = read_record(store, run_id, "local_areas")
    files = {code: f"{H5_ROOT}/{wanted[code].relpath}" for code in codes}
    return validate_with_model(
        area_files={code: store.path(store.run_key(run_id, rel)) for code, rel in files.items()},
        release_figures={code: areas.output_figures[rel] for code, rel in files.items()},
        db_path=artifact(store, run_id, "policy_data_db"),
        period=config.dataset.period,
        person_tolerance=settings.person_tolerance,
        run_model=model_on(compute),
        out_dir=store.output_path(run_id, DIAGNOSTICS),
    )


@dataclass(frozen=True)
class StepSpec:
    """One step of a release, declared once: the modules whose source is its code version, what runs
    it, the file it is known by, the packaged raw inputs it reads (pipeline_assets/data/raw_inputs/:
    hashed when it starts, in its record and reuse key, and unchanged when it ends), and the slice of
    the hashed run configuration it depends on. A step with no slice (the area files, for any change
    of weights; the diagnostics, which record the run) is always rebuilt, never reused from another run."""

    sources: tuple[str, ...]
    run: Callable[..., StepResult] | None  # (store, run_id, config[, compute]); None: the area step (stream_areas)
    primary_output: str | None = None
    raw_inputs: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    on_compute: bool = False  # runs on the compute resource (the local pool, or Modal): the fits and the model
    fit_scope: str | None = None

    @cached_property
    def code_version(self) -> str:
        return code_version(*self.sources)


def fit_spec(step: str, scope: str) -> StepSpec:
    """A fit: the weights of one scope (local: states and districts; national), on the compute resource."""
    log_name = "state_calibration_log" if scope == "local" else "national_calibration_log"
    return StepSpec(sources=("pipeline_assets.steps.weights", "pipeline_assets.steps.calibration"),
                    run=fit_on_compute(step, log_name), primary_output=ARTIFACTS[step], config=(f"{scope}_fit",),
                    on_compute=True, fit_scope=scope)


STEPS = {
    "policy_data_db": StepSpec(
        sources=("pipeline_assets.steps.database", "pipeline_assets.steps.geography"),
        run=run_database,
        primary_output=ARTIFACTS["policy_data_db"],
        raw_inputs=database.RAW_INPUT_FILES,
        config=("database", "build_database"),
    ),
    "source_datasets": StepSpec(
        sources=("pipeline_assets.steps.datasets", "pipeline_assets.steps.geography", "pipeline_assets.steps.h5io",
                 "pipeline_assets.steps.policyengine", "pipeline_assets.steps.uprating"),
        run=run_datasets,
        primary_output=ARTIFACTS["source_datasets"],
        raw_inputs=datasets.RAW_INPUT_FILES,
        config=("dataset",),
    ),
    "calibration_package": StepSpec(
        sources=("pipeline_assets.steps.calibration", "pipeline_assets.steps.h5io", "pipeline_assets.steps.uprating"),
        run=run_calibration_package,
        primary_output=ARTIFACTS["calibration_package"],
        raw_inputs=(*geography.GEOGRAPHY_FILES, uprating.CPI_FILE),  # the districts, populations, county shares; the CPI-U
        config=("calibration",),
    ),
    "state_weights": fit_spec("state_weights", "local"),
    "national_weights": fit_spec("national_weights", "national"),
    "local_areas": StepSpec(
        sources=("pipeline_assets.steps.local_areas", "pipeline_assets.steps.h5io", "pipeline_assets.steps.policyengine",
                 "pipeline_assets.steps.geography"),
        run=None,
        raw_inputs=(geography.DISTRICT_LIST, geography.COUNTY_FIPS),  # the area list and its counties
    ),
    "run_diagnostics": StepSpec(
        sources=("pipeline_assets.steps.diagnostics",),
        run=run_diagnostics,
        primary_output=f"{DIAGNOSTICS}/validation.csv",
    ),
    "model_validation": StepSpec(
        sources=("pipeline_assets.steps.model_validation",),
        run=run_model_validation,
        primary_output=f"{DIAGNOSTICS}/model_validation.json",
        raw_inputs=(geography.DISTRICT_LIST,),
        on_compute=True,
    ),
}
assert tuple(STEPS) == STEP_ORDER, "the step specs follow the release's order (step_graph.STEP_ORDER)"


def _relative(store: LocalRunStore, run_id: str, paths) -> list[str]:
    run_dir = store.path(store.run_key(run_id))
    return [str(Path(p).relative_to(run_dir)) for p in paths]


def _result_of(store: LocalRunStore, run_id: str, record: StepRecord, reused_from: str | None) -> StepResult:
    """The StepResult of a step taken from a record (kept or reused) instead of computed."""
    run_dir = store.path(store.run_key(run_id))
    return StepResult(outputs={rel: run_dir / rel for rel in record.outputs}, figures=record.figures, reused_from=reused_from)


class RawInputChanged(RuntimeError):
    """A raw input's bytes changed while a step read it."""


def hash_raw_inputs(step: str) -> dict[str, str]:
    """{"raw_inputs/NAME": sha256} of the raw inputs `step` reads, as their bytes are now."""
    return {f"{geography.RAW_INPUTS_PREFIX}/{name}": digest
            for name, digest in sorted(geography.raw_input_sha256(STEPS[step].raw_inputs).items())}


def check_raw_inputs_unchanged(step: str, read: dict[str, str]) -> None:
    """Fail the step when a raw input it hashed at its start has other bytes at its end."""
    now = hash_raw_inputs(step)
    for rel, digest in read.items():
        if now.get(rel) != digest:
            raise RawInputChanged(
                f"raw input {rel} changed while step {step} read it: sha256 {digest} at its start, "
                f"{now.get(rel, 'missing')} at its end"
            )


def _record(store, run_id, step, config: RunConfig, env: RuntimeEnvironment, outputs: dict[str, str], **extra) -> StepRecord:
    """The step's identity (and so its reuse key): code, environment, config section, upstream
    outputs and the raw inputs' bytes as they are at its start."""
    hashed = hashed_config(config)
    section_hash = step_config_hash({name: hashed[name] for name in STEPS[step].config})
    inputs = {}
    for upstream in STEP_INPUTS[step]:
        record = read_record(store, run_id, upstream)
        if record is None:
            raise FileNotFoundError(f"step {step} of run {run_id} needs {upstream}, which has not run")
        inputs[upstream] = record.outputs_digest()
    identity = env_id(env)
    raw_inputs = hash_raw_inputs(step)
    return StepRecord(
        step=step,
        reuse_key=reuse_key(step, STEPS[step].code_version, identity, section_hash, inputs, raw_inputs),
        code_version=STEPS[step].code_version,
        env_id=identity,
        config_hash=section_hash,
        inputs=inputs,
        raw_inputs=raw_inputs,
        outputs=outputs,
        environment=env.model_dump(),
        **extra,
    )


def execute_step(
    store: LocalRunStore, run_id: str, step: str, config: RunConfig, env: RuntimeEnvironment, compute=None
) -> tuple[StepResult, StepRecord]:
    """Run one step, or reuse an earlier run's identical output (unless config.reuse is off).

    The fits and the model validation run on `compute` (default: this machine's pool); the other
    steps always run here.
    """
    started = utcnow()
    probe = _record(store, run_id, step, config, env, outputs={})
    kept = read_record(store, run_id, step)
    if kept is not None and kept.reuse_key == probe.reuse_key and verifies(store, run_id, kept):
        # A resumed run keeps what it already made: same code, environment, config and inputs.
        return _result_of(store, run_id, kept, kept.reused_from), kept
    found = None
    spec = STEPS[step]
    if spec.config and config.reuse:
        found = find_reusable(store, run_id, step, probe.reuse_key, SealedRunLender(store))
    if found is not None:
        source_run, source = found
        link_outputs(store, source_run, run_id, source.outputs)
        result = _result_of(store, run_id, source, source_run)
        record = probe.model_copy(update={
            "outputs": source.outputs, "figures": source.figures, "reuse": "reused", "reused_from": source_run,
            "started_at": started, "ended_at": utcnow(),
        })
    else:
        result = spec.run(store, run_id, config, compute or LocalPool()) if spec.on_compute else spec.run(store, run_id, config)
        check_raw_inputs_unchanged(step, probe.raw_inputs)
        written = [p for p in result.outputs.values() if Path(p).is_file()]
        record = probe.model_copy(update={
            "outputs": hash_outputs(store, run_id, _relative(store, run_id, written)),
            "figures": result.figures,
            "environment": {**probe.environment, **result.environment},
            "reuse": "reused" if result.reused_from else "computed",
            "reused_from": result.reused_from,
            "raw_inputs": {} if result.reused_from else probe.raw_inputs,  # a copied database read none
            "started_at": started,
            "ended_at": utcnow(),
        })
    write_record(store, run_id, record)
    return result, record


def area_probe(store: LocalRunStore, run_id: str, env: RuntimeEnvironment) -> StepRecord:
    """The area step's identity before its first file: code, environment, inputs, the reuse key of
    each part, and whether it builds the run's areas (computed) or rebuilds a completed run's (rebuilt)."""
    meta = store.read_meta(run_id)
    reuse = "rebuilt" if meta.status in SEALED else "computed"
    probe = _record(store, run_id, "local_areas", RunConfig.model_validate(meta.config), env, outputs={}, reuse=reuse)
    probe.part_keys = {
        part: reuse_key(f"local_areas:{part}", probe.code_version, probe.env_id, probe.config_hash,
                        {name: probe.inputs[name] for name in inputs}, probe.raw_inputs)
        for part, inputs in AREA_PART_INPUTS.items()
    }
    return probe


def reuse_area_parts(
    store: LocalRunStore, run_id: str, probe: StepRecord, reused: dict[str, str]
) -> Iterator[AreaResult]:
    """The results of every part of the area step an earlier run made from the same code,
    environment and inputs, its files linked into this run; `reused` gets part -> that run."""
    lender = SealedRunLender(store)  # one per step: each source run's TRO chain is checked once
    for part, key in probe.part_keys.items():
        found = find_reusable_part(store, run_id, "local_areas", part, key, AREA_PATHS_BY_PART[part], lender)
        if found is None:
            continue
        source, record, files = found
        link_outputs(store, source, run_id, files)
        reused[part] = source
        for rel, digest in files.items():
            area = AREAS_BY_PATH[rel]
            yield AreaResult(area=area.code, kind=area.kind, relpath=area.relpath, sha256=digest,
                             reused_from=source, **record.output_figures[rel])


def stream_areas(
    store: LocalRunStore, run_id: str, pool: LocalPool, probe: StepRecord, area_codes: set[str] | None = None
) -> Generator[AreaResult, None, StepRecord]:
    """Build the area files, yielding each result as its file is written; return the step's record
    (its identity is `probe`, from area_probe) of every file's hash, written after the last.

    A rebuild of some areas adds to the run's record. A rebuild in a completed run is verified to
    reproduce its files (all of them, before any is reported) and recorded beside the original
    record (steps/local_areas.rebuild-N.json), never over it.
    """
    started = utcnow()
    if probe.reuse == "rebuilt":
        results = rebuild_sealed_areas(store, run_id, pool, area_codes)
        outputs = {f"{H5_ROOT}/{r.relpath}": r.sha256 for r in results}
        record = probe.model_copy(update={"outputs": dict(sorted(outputs.items())), "started_at": started, "ended_at": utcnow()})
        write_record(store, run_id, record, name=next_rebuild_name(store, run_id, "local_areas"))
        yield from results
        return record
    previous = read_record(store, run_id, "local_areas") if area_codes is not None else None
    outputs = dict(previous.outputs) if previous else {}
    figures = dict(previous.output_figures) if previous else {}
    reused: dict[str, str] = {}
    to_build: set[str] = set()

    def built() -> Iterator[AreaResult]:  # runs once the reused parts are known
        to_build.update(area.code for area in wanted_areas(area_codes) if area_part(area) not in reused)
        if to_build:
            yield from run_local_areas(store, run_id, pool, to_build)

    reusing = area_codes is None and RunConfig.model_validate(store.read_meta(run_id).config).reuse
    for result in chain(reuse_area_parts(store, run_id, probe, reused) if reusing else (), built()):
        rel = f"{H5_ROOT}/{result.relpath}"
        outputs[rel] = result.sha256
        figures[rel] = result.model_dump(include=set(AREA_FIGURES))
        yield result
    check_raw_inputs_unchanged("local_areas", probe.raw_inputs)
    sources = set(reused.values())
    all_reused = not to_build
    record = probe.model_copy(update={
        "outputs": dict(sorted(outputs.items())),
        "output_figures": dict(sorted(figures.items())),
        "reused_parts": reused,
        "reuse": "reused" if all_reused else "computed",
        "reused_from": sources.pop() if all_reused and len(sources) == 1 else None,
        "started_at": started,
        "ended_at": utcnow(),
    })
    write_record(store, run_id, record)
    return record


def execute_areas(
    store: LocalRunStore, run_id: str, pool: LocalPool, env: RuntimeEnvironment, area_codes: set[str] | None = None
) -> tuple[list[AreaResult], StepRecord]:
    """stream_areas all at once: (every result, the step's record)."""
    stream, results = stream_areas(store, run_id, pool, area_probe(store, run_id, env), area_codes), []
    while True:
        try:
            results.append(next(stream))
        except StopIteration as done:
            return results, done.value
