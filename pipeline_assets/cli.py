"""usdata-pipeline: run a release through Dagster, see where runs stand, and query, compare and reproduce them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline_assets import history
from pipeline_assets.identity import InvalidRunId, VersionSkewError, parse_run_id
from pipeline_assets.promotion import PromotionFailed
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.steps.config import SCALES, RunConfig, config_for_scale
from pipeline_assets.tro import TRO_BASE_FORM, TRO_BASE_VARIABLE, is_tro_base
from resources.git import CODE_SHA_VARIABLE, SOURCE_ROOT, GitError, code_state, running_code_sha
from resources.ledger import LEDGER_VARIABLE, location_problem, redact
from resources.lineage import TRANSPORT_VARIABLE, LineageSettings
from resources.publishers import PublishError
from resources.registry import RegistryError, validate_version
from resources.run_store import (
    DEFAULT_STORE,
    STORE_VARIABLE,
    LocalRunStore,
    RunMeta,
    RunStoreError,
    StepTiming,
    directory_problem,
    settle_if_orphaned,
    settle_orphans,
)
from resources.runtime import IMAGE_DIGEST_VARIABLES, INSTANCE_VARIABLES, POOL_VARIABLES, PROVIDER_VARIABLES, REGION_VARIABLES

if TYPE_CHECKING:  # the launcher imports Dagster; commands that need it import it themselves
    from pipeline_assets.launch import LaunchOutcome

USER_ERRORS = (InvalidRunId, VersionSkewError, GitError, RunStoreError, ValueError)  # includes refusals
BACKEND_ERRORS = (PromotionFailed, RegistryError, PublishError)


class CliError(Exception):
    """A one-line message for the user; exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; one line is enough
        raise CliError(message)


CORES = os.cpu_count() or 1
# Process and thread counts beyond a few per core only add memory and switching, never speed.
MAX_PER_CORE = 4
MAX_EPOCHS = 100_000


def _int_at_least(minimum: int, maximum: int | None = None, why: str = ""):
    """An argparse type: an integer from `minimum` to `maximum` (`why`: where that bound comes from),
    with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}{why}")
        return value

    return parse


def _per_core_count() -> Callable[[str], int]:
    return _int_at_least(1, MAX_PER_CORE * CORES, f" ({MAX_PER_CORE} x the {CORES} cores of this machine)")


def _run_id(text: str) -> str:
    """An argparse type: a well-formed run_id (an empty one is malformed, never "every run")."""
    try:
        parse_run_id(text)
    except InvalidRunId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _version(text: str) -> str:
    try:
        return validate_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sha(text: str) -> str:
    """An argparse type: 7 to 40 hex digits (a shorter prefix is ambiguous, and it is never a branch)."""
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA: expected 7 to 40 hex digits")
    return text.lower()


def _ref_name(text: str) -> str:
    if not text or text.startswith("-") or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a branch or tag name")
    return text


def _factor(text: str) -> float:
    """An argparse type: a finite number above 1 (nan and inf would flag everything or nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 1 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"factor {value} must be greater than 1 (and finite)")
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="usdata-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = commands.add_parser("run", help="run a whole release for one pinned SHA")
    run.add_argument("--branch", type=_ref_name, help="branch (or tag) to pin; default: the checkout's HEAD")
    run.add_argument("--sha", type=_sha, help="full or short SHA (7-40 hex digits) to pin (instead of --branch)")
    run.add_argument("--scale", choices=list(SCALES), default="small")
    run.add_argument("--epochs", type=_int_at_least(1, MAX_EPOCHS), help="epochs of both fits (default: the scale's)")
    run.add_argument("--workers", type=_per_core_count(), help=f"local area workers (default 2, at most {MAX_PER_CORE} per core)")
    run.add_argument("--fit-threads", type=_per_core_count(),
                     help="CPU threads of each fit (default: the cores divided among the fits running at the "
                          "moment, as the release job runs both fits at once)")
    run.add_argument("--fit-device", choices=["cpu", "cuda"], default="cpu",
                     help="where both fits run: cuda needs a GPU (local, or Modal's with PIPELINE_COMPUTE=modal)")
    database = run.add_mutually_exclusive_group()
    database.add_argument("--build-database", dest="build_database", action="store_true", default=True)
    database.add_argument("--reuse-database", dest="build_database", action="store_false",
                          help="take policy_data.db from the newest completed run instead of building it")

    run.add_argument("--no-reuse", dest="reuse", action="store_false",
                     help="compute every step even where an earlier run's identical output exists")

    status = commands.add_parser("status", help="a table of runs, or one run's steps")
    status.add_argument("run_id", nargs="?", type=_run_id)

    resume = commands.add_parser("resume", help="re-execute the failed and never-run steps of a failed run")
    resume.add_argument("run_id", type=_run_id)

    promote = commands.add_parser("promote", help="publish a completed run as a release version")
    promote.add_argument("run_id", type=_run_id)
    promote.add_argument("--version", required=True, type=_version, help="the release version, semver MAJOR.MINOR.PATCH")
    promote.add_argument("--allow-dirty", action="store_true", help="promote a run made from a dirty work tree")

    rollback = commands.add_parser("rollback", help="publish an older version's files as a new version")
    rollback.add_argument("--to", required=True, dest="to_version", type=_version, help="the version whose files to publish")
    rollback.add_argument("--as", required=True, dest="as_version", type=_version, help="the new version (it becomes current)")

    commands.add_parser("versions", help="the version registry, newest first")

    clean = commands.add_parser("clean", help="remove old runs that no registry entry references")
    clean.add_argument("--keep", type=_int_at_least(0), required=True, help="how many of the newest runs to keep")

    verify = commands.add_parser("verify", help="re-hash a run's files against every TRO revision and check its signatures, "
                                                "or a released version's production copy against its release TRO")
    verify.add_argument("run_id", nargs="?", type=_run_id)
    verify.add_argument("--release", metavar="VERSION", type=_version, help="verify this promoted version's production copy instead of a run")

    reproduce = commands.add_parser("reproduce", help="re-run a completed run at its SHA and config; compare the bytes")
    reproduce.add_argument("run_id", type=_run_id)
    reproduce.add_argument("--force", action="store_true", help="reproduce even where the environment (env_id) differs")

    runs = commands.add_parser("runs", help="runs with their provenance, filtered by any field")
    _add_where(runs)
    runs.add_argument("--fields", type=_field_list, default=[], metavar="FIELD[,FIELD]",
                      help="more table columns, e.g. config.local_fit.epochs,state_weights.final_mean_rel_abs_error")
    runs.add_argument("--format", choices=["table", "json"], default="table", help="json: every field of every run")

    timeline = commands.add_parser("timeline", help="a metric over time per provenance class, excursions flagged")
    timeline.add_argument("metric", help="a numeric field, e.g. state_weights.final_mean_rel_abs_error")
    timeline.add_argument("--by", type=_field_list, required=True, metavar="FIELD[,FIELD]",
                          help="the fields that make a class, e.g. config_hash,dataset_sha256")
    timeline.add_argument("--factor", type=_factor, default=1.5,
                          help="excursion: worse than this times the median of the class's other runs (> 1)")
    timeline.add_argument("--higher-is-better", action="store_true", help="the metric improves upwards")
    _add_where(timeline)
    timeline.add_argument("--format", choices=["table", "json", "png"], default="table")
    timeline.add_argument("--output", type=Path, help="the PNG to write (--format png)")
    timeline.add_argument("--fail-on-excursion", action="store_true", help="exit 1 when any run is flagged")

    compare = commands.add_parser("compare", help="what differs between two runs")
    compare.add_argument("run_a", type=_run_id)
    compare.add_argument("run_b", type=_run_id)
    compare.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def _field_list(text: str) -> list[str]:
    """An argparse type: FIELD[,FIELD] (no empty names)."""
    names = text.split(",")
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD[,FIELD]")
    return names


def _add_where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep runs whose FIELD matches VALUE (a glob: sha=a1b2c3d4*); repeat to narrow")


def _report(step: str, status: str, duration: float | None) -> None:
    mark = {"running": "..", "succeeded": "ok", "failed": "FAILED"}.get(status, status)
    timing = f" ({duration:.1f} s)" if duration is not None else ""
    print(f"  [{mark}] {step}{timing}", flush=True)


def refuse_fits_without_their_device(config: RunConfig) -> None:
    """A cuda fit that would run here (local compute) needs a GPU here: refuse before a run is made."""
    if os.environ.get("PIPELINE_COMPUTE", "local") != "local":
        return
    for fit in (config.local_fit, config.national_fit):
        if fit.device == "cuda":
            from pipeline_assets.steps.weights import fit_device  # imports torch: only when asked for

            fit_device(fit)


def command_run(args: argparse.Namespace) -> int:
    from pipeline_assets.launch import launch_release, open_instance

    if args.branch and args.sha:
        raise CliError("give --branch or --sha, not both")
    code = code_state(SOURCE_ROOT, args.sha or args.branch)
    running = running_code_sha()
    if code.sha != running:
        raise CliError(f"cannot run {code.sha}: the installed code is at {running}; check out {code.sha[:8]} first")
    overrides: dict = {"build_database": args.build_database, "reuse": args.reuse}
    if args.epochs:
        overrides |= {"local_fit": {"epochs": args.epochs}, "national_fit": {"epochs": args.epochs}}
    if args.workers:
        overrides["areas"] = {"workers": args.workers}
    for fit in ("local_fit", "national_fit"):
        overrides.setdefault(fit, {})["device"] = args.fit_device
        if args.fit_threads:
            overrides[fit]["threads"] = args.fit_threads
    config = config_for_scale(args.scale, **overrides)
    refuse_fits_without_their_device(config)
    store = LocalRunStore()
    print(f"pinned {code.sha} ({code.branch or 'detached'}{', dirty' if code.dirty else ''}); scale {args.scale}")
    with open_instance() as instance:
        home = Path(instance.root_directory)
        outcome = launch_release(
            store, instance, config, code, report=_report, running_sha=running, compute={"workers": config.areas.workers}
        )
        fits = fit_summary(instance, outcome.meta.run_id)
    print_summary(store, outcome.meta, home, fits, outcome)
    return 0 if outcome.meta.status.value == "completed" else 1


def fit_summary(instance, run_id: str) -> dict[str, tuple[float, float]]:
    from dagster import AssetKey, AssetRecordsFilter

    out = {}
    for name in ("state_weights", "national_weights"):
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(name), asset_partitions=[run_id]), limit=1
        ).records
        if records:
            md = records[0].asset_materialization.metadata
            out[name] = (md["initial_mean_rel_abs_error"].value, md["final_mean_rel_abs_error"].value)
    return out


def print_summary(store: LocalRunStore, meta: RunMeta, home: Path, fits: dict, outcome: LaunchOutcome) -> None:
    run_dir = store.path(store.run_key(meta.run_id))
    print(f"\nrun_id      {meta.run_id}")
    print(f"status      {meta.status.value}" + (f" ({meta.error.step}: {meta.error.message})" if meta.error else ""))
    print(f"run files   {run_dir}")
    print(f"area files  {run_dir / 'h5s'}  (states/, districts/, cities/, national/)")
    print(f"diagnostics {run_dir / 'diagnostics'}")
    for name, (before, after) in fits.items():
        print(f"{name:<15} mean rel_abs_error {before:.4f} -> {after:.4f}")
    if outcome.failed_checks:
        print(f"failed checks: {', '.join(outcome.failed_checks)}")
    if outcome.warned_checks:
        print(f"warnings    {', '.join(outcome.warned_checks)}")
    print(f"Dagster UI  make ui  (DAGSTER_HOME={home}), then open http://127.0.0.1:3000")


def _duration(meta: RunMeta) -> str:
    ended = [t.ended_at for t in meta.step_timings.values() if t.ended_at]
    return f"{(max(ended) - meta.created_at).total_seconds():.0f}s" if ended else "-"


def reuse_summary(timing: StepTiming) -> str:
    """computed, reused from RUN, or computed with the parts taken from earlier runs."""
    text = timing.reuse or "-"
    if timing.reused_from:
        text += f" from {timing.reused_from}"
    parts = ", ".join(f"{part} part from {run}" for part, run in sorted(timing.reused_parts.items()))
    return f"{text} ({parts})" if parts and timing.reuse != "reused" else text


RELEASE_JOB_STEPS = len(STEP_ORDER) + 1  # and staged_release


def command_status(args: argparse.Namespace) -> int:
    """A run whose orchestrator died is settled as failed before it is shown."""
    store = LocalRunStore()
    if args.run_id:
        parse_run_id(args.run_id)
        meta = settle_if_orphaned(store, args.run_id)
        print(f"{meta.run_id}  {meta.status.value}  sha {meta.sha}  branch {meta.branch or '-'}")
        if meta.error:
            print(f"error in {meta.error.step}: {meta.error.message}")
        print(f"{'step':<22}{'status':<11}{'started':<21}{'duration':>9}  reuse")
        for step, t in meta.step_timings.items():
            duration = f"{t.duration_s:.1f}s" if t.duration_s is not None else "-"
            print(f"{step:<22}{t.status:<11}{t.started_at:%Y-%m-%d %H:%M:%S}  {duration:>9}  {reuse_summary(t)}")
        return 0
    settle_orphans(store)
    runs = store.list_runs()
    if not runs:
        print(f"no runs in {store.root}")
        return 0
    print(f"{'run_id':<36}{'status':<11}{'sha':<10}{'started':<21}{'duration':>9}  steps")
    for meta in runs:
        done = sum(t.status == "succeeded" for t in meta.step_timings.values())
        print(f"{meta.run_id:<36}{meta.status.value:<11}{meta.sha[:8]:<10}{meta.created_at:%Y-%m-%d %H:%M:%S}  "
              f"{_duration(meta):>9}  {done}/{RELEASE_JOB_STEPS}")
    return 0


def command_verify(args: argparse.Namespace) -> int:
    """Exit 0 when it verifies, 1 with one line per problem when it does not."""
    from pipeline_assets.promotion import verify_production
    from pipeline_assets.tro import verify_run

    store = LocalRunStore()
    if args.release is not None:
        validate_version(args.release)
        versions = {entry.version: entry for entry in _backends().registry_backend(store).read().versions}
        if args.release not in versions:
            raise CliError(f"--release {args.release}: not a registered version (see usdata-pipeline versions)")
        subject, report = f"release {args.release}", verify_production(store, versions, args.release, store.root / "production")
    else:
        parse_run_id(args.run_id)
        subject, report = args.run_id, verify_run(store, args.run_id)
    if report.ok:
        print(f"OK {subject}: {report.artifacts_checked} artifacts verified")
        return 0
    for line in report.lines():
        print(f"FAILED {subject}: {line}")
    return 1


def command_reproduce(args: argparse.Namespace) -> int:
    from pipeline_assets.launch import open_instance
    from pipeline_assets.reproduce import REPORT, check_reproducible, reproduce

    store = LocalRunStore()
    code = code_state(SOURCE_ROOT)
    config = RunConfig.model_validate(store.read_meta(args.run_id).config)
    refuse_fits_without_their_device(config)
    check_reproducible(store, args.run_id, code, running_code_sha(), args.force)  # refused before the instance is made
    print(f"reproducing {args.run_id} at {code.sha}")
    with open_instance() as instance:
        result = reproduce(store, instance, args.run_id, code, force=args.force, report=_report,
                           compute={"workers": config.areas.workers})
    for difference in result.environment_differences:
        print(f"environment differs: {difference.field}: {difference.recorded} -> {difference.current}")
    identical = sum(a.identical for a in result.artifacts)
    print(f"\n{result.reproduced_run_id}: {identical} of {len(result.artifacts)} files byte-identical to {args.run_id}")
    for artifact in result.artifacts:
        if not artifact.identical:
            print(f"  differs: {artifact.path} ({artifact.reason or 'UNEXPECTED: not reproduced'})")
    print(f"report      {store.path(store.run_key(result.reproduced_run_id, REPORT))}")
    return 1 if result.unexpected else 0


def command_resume(args: argparse.Namespace) -> int:
    from pipeline_assets.launch import open_instance, resume_release

    parse_run_id(args.run_id)
    store = LocalRunStore()
    meta = store.read_meta(args.run_id)
    config = RunConfig.model_validate(meta.config)
    refuse_fits_without_their_device(config)
    print(f"resuming {args.run_id} at {meta.sha}")
    with open_instance() as instance:
        home = Path(instance.root_directory)
        outcome = resume_release(store, instance, args.run_id, report=_report, running_sha=running_code_sha(),
                                 compute={"workers": config.areas.workers})
        fits = fit_summary(instance, args.run_id)
    print_summary(store, outcome.meta, home, fits, outcome)
    return 0 if outcome.meta.status.value == "completed" else 1


def _backends():
    from pipeline_assets.definitions import defs

    return defs.resources["release_backends"]


def command_promote(args: argparse.Namespace) -> int:
    """Refuse fast under the store's release lock (an flock that writes nothing: one line, nothing
    written), then launch the promotion asset through the instance, whose promote() checks again
    under the same lock. Of concurrent promotions one gets through; each other is refused by the
    first check, or by the asset's (its one line reaches the user), never by a half-made release."""
    from pipeline_assets.launch import launch_promotion, open_instance
    from pipeline_assets.promotion import check_promotable

    store = LocalRunStore()
    registry = _backends().registry_backend(store)
    with store.release_lock():  # released before the launch: the promotion's run takes it in its own process
        check_promotable(store, args.run_id, args.version, registry, args.allow_dirty)
    with open_instance() as instance:
        result = launch_promotion(instance, store, args.run_id, args.version, args.allow_dirty)
    if not result.success:
        raise result.error
    meta = store.read_meta(args.run_id)
    print(f"promoted {args.run_id} as {args.version} to {', '.join(meta.promotion.published)}")
    current = registry.read().current
    if current != args.version:
        print(f"current stays {current}: {args.version} is lower (semver precedence); `rollback --to {args.version}` "
              "makes a release of it current")
    return 0


def command_rollback(args: argparse.Namespace) -> int:
    """rollback() checks and publishes under the store's release lock; its refusals write nothing."""
    from pipeline_assets.launch import open_instance
    from pipeline_assets.promotion import rollback
    from pipeline_assets.release import record_rollback

    store = LocalRunStore()
    backends = _backends()
    registry = backends.registry_backend(store)
    entry = rollback(store, args.to_version, args.as_version, backends.publishers(store), registry, store.root / "production")
    with open_instance() as instance:
        record_rollback(instance, entry, registry.read().current)
    print(f"released {entry.version}: the files of {entry.roll_back_version} (run {entry.run_id}); current is {entry.version}")
    return 0


def command_versions(args: argparse.Namespace) -> int:
    store = LocalRunStore()
    registry = _backends().registry_backend(store).read()
    if not registry.versions:
        print("no versions registered")
        return 0
    print(f"{'':2}{'version':<12}{'created':<21}{'run_id':<36}{'sha':<10}{'operation'}")
    for entry in registry.versions:
        mark = "* " if entry.version == registry.current else "  "
        operation = f"roll-back to {entry.roll_back_version}" if entry.special_operation else ""
        print(f"{mark}{entry.version:<12}{entry.created_at:%Y-%m-%d %H:%M:%S}  {entry.run_id:<36}{entry.git_sha[:8]:<10}{operation}")
    return 0


def command_clean(args: argparse.Namespace) -> int:
    from pipeline_assets.launch import open_instance
    from pipeline_assets.partitions import RUN_IDS
    from pipeline_assets.promotion import clean

    store = LocalRunStore()
    if not store.root.is_dir():
        print(f"removed 0 run(s): there is no run store at {store.root}")
        return 0
    removed = clean(store, _backends().registry_backend(store), args.keep)
    if removed:
        with open_instance() as instance:
            for run_id in removed:
                if instance.has_dynamic_partition(RUN_IDS, run_id):
                    instance.delete_dynamic_partition(RUN_IDS, run_id)
    print(f"removed {len(removed)} run(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else history.render(value)


def command_runs(args: argparse.Namespace) -> int:
    """The provenance rows of the store's runs; json gives every field by the names --where takes."""
    rows = history.list_runs(LocalRunStore(), args.where)
    history.require_fields(rows, args.fields)
    fields = [row.fields() for row in rows]
    if args.format == "json":
        print(json.dumps(fields, indent=2))
        return 0
    columns = ["run_id", "status", "sha", "created_at", "env_id", "config_hash", "dataset_sha256", *args.fields]
    shown = {"sha": 8, "dataset_sha256": 12, "created_at": 19}  # prefixes wide enough to tell runs apart
    table = [columns] + [[_cell(values.get(c))[:shown.get(c)] for c in columns] for values in fields]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print(f"{len(rows)} run(s)")
    return 0


def _timeline_png(args: argparse.Namespace) -> Path:
    """--output, or timeline_{metric}_by_{fields}.png here; only with --format png."""
    if args.output and args.format != "png":
        raise CliError("--output is for --format png")
    default = re.sub(r"[^A-Za-z0-9._-]", "_", f"timeline_{args.metric}_by_{'_'.join(args.by)}") + ".png"
    return args.output or Path(default)


def command_timeline(args: argparse.Namespace) -> int:
    """Exit 0 whatever the excursions (a query, not a gate) unless --fail-on-excursion: then 1."""
    png = _timeline_png(args)
    rows = history.list_runs(LocalRunStore(), args.where)
    result = history.timeline(rows, args.metric, args.by, args.factor, args.higher_is_better)
    flagged = result.excursions()
    if args.format == "json":
        print(result.model_dump_json(indent=2))
    elif args.format == "png":
        print(f"wrote {history.plot_timeline(result, png)}")
    else:
        worse = "below 1/" if args.higher_is_better else "above "
        print(f"{result.metric} by {', '.join(result.by)}: excursion = {worse}{result.factor:g} x the median of "
              "the class's other runs")
        for cls in result.classes:
            print(f"\n{cls.label()}  ({len(cls.points)} run(s), median {cls.median:.6g})")
            for point in cls.points:
                ratio = f"{point.value / point.others_median:.2f}x" if point.others_median else "-"
                mark = "  EXCURSION" if point.excursion else ""
                print(f"  {point.created_at:%Y-%m-%d %H:%M:%S}  {point.run_id:<36}{point.status.value:<11}"
                      f"{point.value:<14.6g}{ratio:>8}{mark}")
        if result.without_metric:
            print(f"\nwithout {result.metric}: {', '.join(result.without_metric)}")
    print(f"{len(flagged)} excursion(s)" + (f": {', '.join(p.run_id for p in flagged)}" if flagged else ""),
          file=sys.stderr if args.format == "json" else sys.stdout)
    return 1 if flagged and args.fail_on_excursion else 0


def command_compare(args: argparse.Namespace) -> int:
    """What differs between two runs, section by section (code, environment, configuration, identity
    hashes, inputs, outputs, metrics); exit 0 whether or not they differ."""
    store = LocalRunStore()
    result = history.compare(history.read_provenance(store, args.run_a), history.read_provenance(store, args.run_b))
    if args.format == "json":
        print(result.model_dump_json(indent=2))
        return 0
    print(f"A {result.run_a}\nB {result.run_b}")
    for section, differences in result.sections.items():
        print(f"\n{section}: " + (f"{len(differences)} difference(s)" if differences else "same"))
        for d in differences:
            print(f"  {d.field}: {_cell(d.a)} -> {_cell(d.b)}")
    return 0


COMMANDS = {
    "run": command_run, "resume": command_resume, "reproduce": command_reproduce, "status": command_status,
    "verify": command_verify, "promote": command_promote,
    "rollback": command_rollback, "versions": command_versions, "clean": command_clean,
    "runs": command_runs, "timeline": command_timeline, "compare": command_compare,
}

# --- preflight: every input is checked before any command starts work ----------------------------
EXECUTES = frozenset({"run", "resume", "reproduce"})  # run steps: code, compute, lineage, signing, ledger
RELEASES = frozenset({"promote", "rollback"})
USES_REGISTRY = RELEASES | {"versions", "clean"}
LOADS_DEFINITIONS = EXECUTES | USES_REGISTRY  # import pipeline_assets.definitions (resources, sensors)
USES_INSTANCE = EXECUTES | RELEASES | {"clean"}
WRITES_STORE = EXECUTES | RELEASES | {"clean"}
RUN_ID_ARGUMENTS = ("run_id", "run_a", "run_b")
MODAL_GPU = re.compile(r"(T4|L4|A10G?|A100(-40GB|-80GB)?|L40S|H100!?|H200|B200)(:[1-8])?", re.IGNORECASE)
GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
GCS_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
IMAGE_DIGEST = re.compile(r"([^\s@]+@)?sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Variable:
    """An environment variable the pipeline reads, the commands that read it and what it must be."""

    name: str
    expected: str
    valid: Callable[[str], bool]
    commands: frozenset[str]
    empty_is_unset: bool = True  # as its reader treats it


def _label(value: str) -> bool:
    return value.isprintable() and len(value) <= 200


ENVIRONMENT = (
    Variable(CODE_SHA_VARIABLE, "the full 40-hex-digit (lowercase) SHA of the running code",
             re.compile(r"[0-9a-f]{40}").fullmatch, EXECUTES),
    Variable("PIPELINE_COMPUTE", "local or modal", {"local", "modal"}.__contains__, LOADS_DEFINITIONS, empty_is_unset=False),
    Variable("PIPELINE_MODAL_GPU", "a Modal GPU type (T4, L4, A10G, A100, A100-80GB, L40S, H100, H200, B200), optionally :COUNT",
             MODAL_GPU.fullmatch, LOADS_DEFINITIONS),
    Variable(TRANSPORT_VARIABLE, "file, http or off", {"file", "http", "off"}.__contains__, EXECUTES),
    Variable("PIPELINE_REGISTRY", "local or gcs", {"local", "gcs"}.__contains__, LOADS_DEFINITIONS, empty_is_unset=False),
    Variable("PIPELINE_GCS_BUCKET", "a bucket name (3-63 of a-z 0-9 . _ -)", GCS_BUCKET.fullmatch, LOADS_DEFINITIONS),
    Variable("PIPELINE_GCS_PROJECT", "a project id (6-30 of a-z 0-9 -, starting with a letter)", GCS_PROJECT.fullmatch,
             LOADS_DEFINITIONS),
    Variable("PIPELINE_HF_REPO", "a Hugging Face repo id, OWNER/NAME", HF_REPO.fullmatch, LOADS_DEFINITIONS),
    Variable(TRO_BASE_VARIABLE, TRO_BASE_FORM, is_tro_base, EXECUTES | RELEASES),  # every TRO's @base is minted under it
    *(Variable(name, "[NAME@]sha256:<64 hex digits>", IMAGE_DIGEST.fullmatch, EXECUTES)
      for name in IMAGE_DIGEST_VARIABLES if name.startswith("PIPELINE_")),
    *(Variable(name, "one line of printable text, at most 200 characters", _label, EXECUTES)
      for name in POOL_VARIABLES + REGION_VARIABLES + PROVIDER_VARIABLES + INSTANCE_VARIABLES if name.startswith("PIPELINE_")),
    # Read by sensors/git_sensor.py when the definitions are imported: named here rather than imported
    # from there, so that a bad one is refused before that import fails on it.
    Variable("PIPELINE_WATCH_SCALE", f"one of {', '.join(SCALES)}", SCALES.__contains__, LOADS_DEFINITIONS),
    Variable("PIPELINE_WATCH_BRANCH", "a branch name", lambda value: _label(value) and not value.startswith("-"),
             LOADS_DEFINITIONS),
    Variable("PIPELINE_WATCH_REPO", "the directory of a git repository", lambda value: Path(value).is_dir(), LOADS_DEFINITIONS),
)


def _check_variables(command: str) -> None:
    """Each variable `command` reads, against what it must be; a URL-like value is shown redacted."""
    for variable in ENVIRONMENT:
        value = os.environ.get(variable.name)
        if command not in variable.commands or value is None or (value == "" and variable.empty_is_unset):
            continue
        if not variable.valid(value):
            raise CliError(f"{variable.name}={redact(value)!r}: expected {variable.expected}")
    if command in USES_REGISTRY and os.environ.get("PIPELINE_REGISTRY") == "gcs" and not os.environ.get("PIPELINE_GCS_BUCKET"):
        raise CliError("PIPELINE_REGISTRY='gcs': expected PIPELINE_GCS_BUCKET to name the bucket as well")


def _check_store(command: str) -> None:
    value = os.environ.get(STORE_VARIABLE)
    if value == "":
        raise CliError(f"{STORE_VARIABLE} is set but empty: expected the run store's directory (unset, it is ./{DEFAULT_STORE})")
    problem = directory_problem(LocalRunStore().root, writable=command in WRITES_STORE)
    if problem:
        raise CliError(f"{STORE_VARIABLE}={problem}" if value else f"run store {problem}")


def _check_signing() -> None:
    """A signing key that cannot sign is refused now, not when the run's TRO is written at its end."""
    from pipeline_assets.tro import GPG_KEY_VARIABLE, SigningError, signer_from_environment

    home = os.environ.get("GNUPGHOME")
    if os.environ.get(GPG_KEY_VARIABLE) and home and not Path(home).is_dir():
        raise CliError(f"GNUPGHOME={home!r}: expected the directory of the gpg keyring that holds {GPG_KEY_VARIABLE}")
    signer = signer_from_environment()
    if signer is not None:
        try:
            signer.sign(b"usdata-pipeline: can this key sign?")
        except SigningError as exc:
            raise CliError(f"{GPG_KEY_VARIABLE}={signer.key_id!r}: {exc}; expected a key gpg can sign with") from None


def _check_run_ids(args: argparse.Namespace) -> None:
    """A run the command is about must exist and be readable (one line naming its meta.json if not)."""
    store = LocalRunStore()
    for name in RUN_ID_ARGUMENTS:
        run_id = getattr(args, name, None)
        if run_id is not None:
            store.read_meta(run_id)


def _check_output(args: argparse.Namespace) -> None:
    output = getattr(args, "output", None)
    if output is None:
        return
    if output.is_dir():
        raise CliError(f"--output {output} is a directory: expected a PNG file's path")
    problem = directory_problem(output.resolve().parent)
    if problem:
        raise CliError(f"--output {output}: {problem}")


def preflight(args: argparse.Namespace) -> None:
    """Every input a command takes from outside its arguments' syntax (the environment, the store,
    the Dagster instance, the ledger, lineage, the signing key, the runs it names), checked before it
    starts work: one CliError line naming the value and what was expected, and nothing written."""
    command = args.command
    if command == "verify" and (args.run_id is None) == (args.release is None):  # before the run it names is read
        raise CliError("verify takes a run_id or --release VERSION (exactly one)")
    _check_variables(command)
    _check_store(command)
    if command in USES_INSTANCE:
        from pipeline_assets.launch import checked_dagster_home

        checked_dagster_home()
    if command in EXECUTES:
        running_code_sha()
        LineageSettings.resolve()
        _check_signing()
    ledger = os.environ.get(LEDGER_VARIABLE)
    if ledger and command in EXECUTES | RELEASES:
        problem = location_problem(ledger)
        if problem:
            raise CliError(problem)
    _check_output(args)
    _check_run_ids(args)


class StoreWarnings(logging.Handler):
    """The store's warnings (an unreadable record left out of a listing) as one stderr line each,
    once per command however many listings meet it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage().splitlines()[0]
        if line not in self.seen:
            self.seen.add(line)
            print(f"usdata-pipeline: warning: {line}", file=sys.stderr)


STORE_WARNINGS = StoreWarnings()


def _report_store_warnings() -> None:
    STORE_WARNINGS.seen.clear()
    for name in ("resources.run_store", "pipeline_assets.history"):  # where listings warn
        listing_log = logging.getLogger(name)
        if STORE_WARNINGS not in listing_log.handlers:
            listing_log.addHandler(STORE_WARNINGS)


def main(argv: list[str] | None = None) -> int:
    _report_store_warnings()
    try:
        args = build_parser().parse_args(argv)
        preflight(args)
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"usdata-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        print(f"usdata-pipeline: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except BACKEND_ERRORS as exc:
        print(f"usdata-pipeline: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
