"""usdata-pipeline: run a release through Dagster, see where runs stand, and query, compare and reproduce them."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline_assets import history
from pipeline_assets.identity import InvalidRunId, SOURCE_ROOT, VersionSkewError, parse_run_id, running_code_sha
from pipeline_assets.steps.config import SCALES, RunConfig, config_for_scale
from pipeline_assets.promotion import PromotionFailed
from resources.git import GitError, code_state
from resources.publishers import PublishError
from resources.registry import RegistryError
from resources.run_store import LocalRunStore, RunMeta, RunStoreError, StepTiming, settle_if_orphaned, settle_orphans

if TYPE_CHECKING:  # the launcher imports Dagster; commands that need it import it themselves
    from pipeline_assets.launch import LaunchOutcome

USER_ERRORS = (InvalidRunId, VersionSkewError, GitError, RunStoreError, ValueError)  # includes refusals
BACKEND_ERRORS = (PromotionFailed, RegistryError, PublishError)


class CliError(Exception):
    """A one-line message for the user; exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; one line is enough
        raise CliError(message)


def _int_at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="usdata-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = commands.add_parser("run", help="run a whole release for one pinned SHA")
    run.add_argument("--branch", help="branch (or tag) to pin; default: the checkout's HEAD")
    run.add_argument("--sha", help="full or short SHA to pin (instead of --branch)")
    run.add_argument("--scale", choices=list(SCALES), default="small")
    run.add_argument("--epochs", type=_int_at_least(1), help="epochs of both fits (default: the scale's)")
    run.add_argument("--workers", type=_int_at_least(1), help="local area workers (default 2)")
    run.add_argument("--fit-threads", type=_int_at_least(1),
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
    status.add_argument("run_id", nargs="?")

    resume = commands.add_parser("resume", help="re-execute the failed and never-run steps of a failed run")
    resume.add_argument("run_id")

    promote = commands.add_parser("promote", help="publish a completed run as a release version")
    promote.add_argument("run_id")
    promote.add_argument("--version", required=True, help="the release version, semver MAJOR.MINOR.PATCH")
    promote.add_argument("--allow-dirty", action="store_true", help="promote a run made from a dirty work tree")

    rollback = commands.add_parser("rollback", help="publish an older version's files as a new version")
    rollback.add_argument("--to", required=True, dest="to_version", help="the version whose files to publish")
    rollback.add_argument("--as", required=True, dest="as_version", help="the new version")

    commands.add_parser("versions", help="the version registry, newest first")

    clean = commands.add_parser("clean", help="remove old runs that no registry entry references")
    clean.add_argument("--keep", type=_int_at_least(0), required=True, help="how many of the newest runs to keep")

    verify = commands.add_parser("verify", help="re-hash a run's files against its TRO and check its signature")
    verify.add_argument("run_id")

    reproduce = commands.add_parser("reproduce", help="re-run a completed run at its SHA and config; compare the bytes")
    reproduce.add_argument("run_id")
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
    timeline.add_argument("--factor", type=float, default=1.5,
                          help="excursion: worse than this times the median of the class's other runs (> 1)")
    timeline.add_argument("--higher-is-better", action="store_true", help="the metric improves upwards")
    _add_where(timeline)
    timeline.add_argument("--format", choices=["table", "json", "png"], default="table")
    timeline.add_argument("--output", type=Path, help="the PNG to write (--format png)")
    timeline.add_argument("--fail-on-excursion", action="store_true", help="exit 1 when any run is flagged")

    compare = commands.add_parser("compare", help="what differs between two runs")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
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
    from pipeline_assets.launch import dagster_home, launch_release
    from dagster import DagsterInstance

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
    home = dagster_home()
    print(f"pinned {code.sha} ({code.branch or 'detached'}{', dirty' if code.dirty else ''}); scale {args.scale}")
    with DagsterInstance.get() as instance:
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


RELEASE_JOB_STEPS = 8  # stages.STEP_ORDER and staged_release (stages is not imported here: it loads pandas)


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
        print(f"{meta.run_id:<36}{meta.status.value:<11}{meta.sha[:8]:<10}{meta.created_at:%Y-%m-%d %H:%M:%S}  {_duration(meta):>9}  {done}/{RELEASE_JOB_STEPS}")
    return 0


def command_verify(args: argparse.Namespace) -> int:
    from pipeline_assets.tro import verify_run

    parse_run_id(args.run_id)
    report = verify_run(LocalRunStore(), args.run_id)
    if report.ok:
        print(f"OK {args.run_id}: {report.artifacts_checked} artifacts verified")
        return 0
    for line in report.lines():
        print(f"FAILED {args.run_id}: {line}")
    return 1


def command_reproduce(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from pipeline_assets.launch import dagster_home
    from pipeline_assets.reproduce import REPORT, reproduce

    parse_run_id(args.run_id)
    store = LocalRunStore()
    code = code_state(SOURCE_ROOT)
    config = RunConfig.model_validate(store.read_meta(args.run_id).config)
    refuse_fits_without_their_device(config)
    dagster_home()
    print(f"reproducing {args.run_id} at {code.sha}")
    with DagsterInstance.get() as instance:
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
    from dagster import DagsterInstance

    from pipeline_assets.launch import dagster_home, resume_release

    parse_run_id(args.run_id)
    store = LocalRunStore()
    meta = store.read_meta(args.run_id)
    config = RunConfig.model_validate(meta.config)
    refuse_fits_without_their_device(config)
    home = dagster_home()
    print(f"resuming {args.run_id} at {meta.sha}")
    with DagsterInstance.get() as instance:
        outcome = resume_release(store, instance, args.run_id, report=_report, running_sha=running_code_sha(),
                                 compute={"workers": config.areas.workers})
        fits = fit_summary(instance, args.run_id)
    print_summary(store, outcome.meta, home, fits, outcome)
    return 0 if outcome.meta.status.value == "completed" else 1


def _backends():
    from pipeline_assets.definitions import defs

    return defs.resources["release_backends"]


def command_promote(args: argparse.Namespace) -> int:
    """Refuse fast (one line, nothing written), then materialize the promotion asset in Dagster."""
    from dagster import DagsterInstance

    from pipeline_assets.definitions import defs
    from pipeline_assets.launch import dagster_home
    from pipeline_assets.partitions import RUN_IDS
    from pipeline_assets.promotion import check_promotable

    parse_run_id(args.run_id)
    store = LocalRunStore()
    backends = _backends()
    check_promotable(store, args.run_id, args.version, backends.registry_backend(store), args.allow_dirty)
    dagster_home()
    with DagsterInstance.get() as instance:
        if not instance.has_dynamic_partition(RUN_IDS, args.run_id):
            instance.add_dynamic_partitions(RUN_IDS, [args.run_id])
        result = defs.resolve_job_def("promote").execute_in_process(
            partition_key=args.run_id,
            instance=instance,
            raise_on_error=False,
            run_config={
                "ops": {"promotion": {"config": {"version": args.version, "allow_dirty": args.allow_dirty}}},
                "resources": {"run_store": {"config": {"root": str(store.root)}}},
            },
        )
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        message = failure.step_failure_data.error.message.strip().splitlines()[-1] if failure else "see the Dagster run"
        print(f"usdata-pipeline: error: promotion of {args.run_id} failed: {message}", file=sys.stderr)
        return 1
    meta = store.read_meta(args.run_id)
    print(f"promoted {args.run_id} as {args.version} to {', '.join(meta.promotion.published)}")
    return 0


def command_rollback(args: argparse.Namespace) -> int:
    from pipeline_assets.promotion import rollback

    store = LocalRunStore()
    backends = _backends()
    entry = rollback(store, args.to_version, args.as_version, backends.publishers(store),
                     backends.registry_backend(store), store.root / "production")
    print(f"released {entry.version}: the files of {entry.roll_back_version} (run {entry.run_id})")
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
    from dagster import DagsterInstance

    from pipeline_assets.launch import dagster_home
    from pipeline_assets.partitions import RUN_IDS
    from pipeline_assets.promotion import clean

    store = LocalRunStore()
    removed = clean(store, _backends().registry_backend(store), args.keep)
    dagster_home()
    with DagsterInstance.get() as instance:
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
    "run": command_run, "resume": command_resume, "reproduce": command_reproduce, "status": command_status, "verify": command_verify, "promote": command_promote,
    "rollback": command_rollback, "versions": command_versions, "clean": command_clean,
    "runs": command_runs, "timeline": command_timeline, "compare": command_compare,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
