"""usdata-pipeline: run a release through Dagster, and see where runs stand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_assets.identity import InvalidRunId, SOURCE_ROOT, VersionSkewError, parse_run_id, running_code_sha
from pipeline_assets.steps.config import SCALES, RunConfig, config_for_scale
from pipeline_assets.promotion import PromotionFailed
from resources.git import GitError, code_state
from resources.publishers import PublishError
from resources.registry import RegistryError
from resources.run_store import LocalRunStore, RunMeta, RunStoreError

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
    return parser


def _report(step: str, status: str, duration: float | None) -> None:
    mark = {"running": "..", "succeeded": "ok", "failed": "FAILED"}.get(status, status)
    timing = f" ({duration:.1f} s)" if duration is not None else ""
    print(f"  [{mark}] {step}{timing}", flush=True)


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
    config = config_for_scale(args.scale, **overrides)
    store = LocalRunStore()
    home = dagster_home()
    print(f"pinned {code.sha} ({code.branch or 'detached'}{', dirty' if code.dirty else ''}); scale {args.scale}")
    with DagsterInstance.get() as instance:
        outcome = launch_release(
            store, instance, config, code, report=_report, running_sha=running, compute={"workers": config.areas.workers}
        )
        fits = fit_summary(instance, outcome.meta.run_id)
    print_summary(store, outcome.meta, home, fits, outcome.failed_checks)
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


def print_summary(store: LocalRunStore, meta: RunMeta, home: Path, fits: dict, failed_checks: list[str]) -> None:
    run_dir = store.path(store.run_key(meta.run_id))
    print(f"\nrun_id      {meta.run_id}")
    print(f"status      {meta.status.value}" + (f" ({meta.error.step}: {meta.error.message})" if meta.error else ""))
    print(f"run files   {run_dir}")
    print(f"area files  {run_dir / 'h5s'}  (states/, districts/, cities/, national/)")
    print(f"diagnostics {run_dir / 'diagnostics'}")
    for name, (before, after) in fits.items():
        print(f"{name:<15} mean rel_abs_error {before:.4f} -> {after:.4f}")
    if failed_checks:
        print(f"failed checks: {', '.join(failed_checks)}")
    print(f"Dagster UI  make ui  (DAGSTER_HOME={home}), then open http://127.0.0.1:3000")


def _duration(meta: RunMeta) -> str:
    ended = [t.ended_at for t in meta.step_timings.values() if t.ended_at]
    return f"{(max(ended) - meta.created_at).total_seconds():.0f}s" if ended else "-"


def command_status(args: argparse.Namespace) -> int:
    store = LocalRunStore()
    if args.run_id:
        parse_run_id(args.run_id)
        meta = store.read_meta(args.run_id)
        print(f"{meta.run_id}  {meta.status.value}  sha {meta.sha}  branch {meta.branch or '-'}")
        if meta.error:
            print(f"error in {meta.error.step}: {meta.error.message}")
        print(f"{'step':<22}{'status':<11}{'started':<21}{'duration':>9}")
        for step, t in meta.step_timings.items():
            duration = f"{t.duration_s:.1f}s" if t.duration_s is not None else "-"
            print(f"{step:<22}{t.status:<11}{t.started_at:%Y-%m-%d %H:%M:%S}  {duration:>9}")
        return 0
    runs = store.list_runs()
    if not runs:
        print(f"no runs in {store.root}")
        return 0
    print(f"{'run_id':<36}{'status':<11}{'sha':<10}{'started':<21}{'duration':>9}  steps")
    for meta in runs:
        done = sum(t.status == "succeeded" for t in meta.step_timings.values())
        print(f"{meta.run_id:<36}{meta.status.value:<11}{meta.sha[:8]:<10}{meta.created_at:%Y-%m-%d %H:%M:%S}  {_duration(meta):>9}  {done}/7")
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
    workers = RunConfig.model_validate(store.read_meta(args.run_id).config).areas.workers
    dagster_home()
    print(f"reproducing {args.run_id} at {code.sha}")
    with DagsterInstance.get() as instance:
        result = reproduce(store, instance, args.run_id, code, force=args.force, report=_report,
                           compute={"workers": workers})
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
    workers = RunConfig.model_validate(meta.config).areas.workers
    home = dagster_home()
    print(f"resuming {args.run_id} at {meta.sha}")
    with DagsterInstance.get() as instance:
        outcome = resume_release(store, instance, args.run_id, report=_report, running_sha=running_code_sha(),
                                 compute={"workers": workers})
        fits = fit_summary(instance, args.run_id)
    print_summary(store, outcome.meta, home, fits, outcome.failed_checks)
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


COMMANDS = {
    "run": command_run, "resume": command_resume, "reproduce": command_reproduce, "status": command_status, "verify": command_verify, "promote": command_promote,
    "rollback": command_rollback, "versions": command_versions, "clean": command_clean,
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
