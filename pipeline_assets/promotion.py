"""Staging and promotion: the deliberate act that turns a reviewed run into a release.

`stage_release` gathers what a release publishes under staging/{run_id}/ with a manifest of paths
and sha256s. `promote` refuses (one line, nothing written) unless the run completed, its files
verify against its TRO, its tree was clean (or dirt is allowed) and the version is new valid semver;
then it publishes to every backend and, only when all succeeded, writes the registry and marks the
run promoted. A backend failure leaves the registry as it was and meta.json saying what is where.
Each registered version (a promotion or a rollback) is then committed to the git ledger when one is
configured: its registry entry, its release TRO and the run's meta.json, in one commit.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar

from pydantic import BaseModel

from pipeline_assets import stages, step_graph
from pipeline_assets.reuse import read_record
from pipeline_assets.tro import (
    RELEASE_ARRANGEMENT_ID,
    TRO_NAME,
    ModelPackage,
    VerifyReport,
    located,
    model_package,
    read_tro,
    run_records,
    seal_tro,
    verify_release,
    verify_run,
    write_release_tro,
)
from resources.files import link_or_copy, sha256_file, write_bytes_atomic
from resources.ledger import GitLedger, configured_ledger
from resources.lineage import LINEAGE_DIR
from resources.publishers import Publisher
from resources.registry import (
    DuplicateVersion,
    LocalRegistry,
    PolicyEngineUsBuild,
    RegistryBackend,
    VersionManifest,
    validate_version,
)
from resources.run_store import LocalRunStore, PromotionState, RunMeta, RunStatus, RunStoreError, settle_orphans, utcnow

Result = TypeVar("Result")
STAGING_MANIFEST = "manifest.json"
PRODUCTION = "production"
KEPT_STATUSES = frozenset({RunStatus.running, RunStatus.promoted})  # clean never removes these
RELEASE_TRO = "release.tro.jsonld"
# What a release publishes: run path prefix -> path in the release ("" keeps the run's path).
PUBLISHED = {
    f"{stages.H5_ROOT}/": "",  # h5s/states/AL.h5 -> states/AL.h5
    "artifacts/policy_data.db": "artifacts/policy_data.db",
    "artifacts/source_datasets.h5": "artifacts/source_datasets.h5",
    "artifacts/state_weights.npy": "artifacts/state_weights.npy",
    "artifacts/national_weights.npy": "artifacts/national_weights.npy",
    f"{stages.DIAGNOSTICS}/": f"{stages.DIAGNOSTICS}/",
}


class PromotionRefused(ValueError):
    """A promotion that must not happen; nothing was written."""


class CleanRefused(ValueError):
    """clean cannot tell what is safe to remove; nothing was removed."""


class PromotionFailed(RuntimeError):
    """A backend failed midway; the registry is unchanged and meta.json says what is where."""


def policyengine_us_build(model: ModelPackage | None) -> PolicyEngineUsBuild | None:
    """The registry's policyengine_us block, only where the model the run ran is policyengine-us
    (its name compared as PyPI compares distribution names)."""
    if model is None or re.sub(r"[-_.]+", "-", model.name).lower() != "policyengine-us":
        return None
    return PolicyEngineUsBuild(version=model.version, locked_version=model.locked_version, git_commit=model.git_sha)


class StagingManifest(BaseModel):
    run_id: str
    files: dict[str, str]  # path in the release -> sha256


def release_path(run_rel: str) -> str | None:
    """Where a file of the run goes in a release; None for a file no release publishes (a hidden or
    temporary name, like an interrupted write's, never is)."""
    if PurePosixPath(run_rel).name.startswith(".") or run_rel.endswith(".tmp"):
        return None
    for prefix, target in PUBLISHED.items():
        if run_rel == prefix or (prefix.endswith("/") and run_rel.startswith(prefix)):
            return target + run_rel.removeprefix(prefix) if prefix.endswith("/") else target
    return None


def staging_key(run_id: str, rel: str = "") -> str:
    return f"staging/{run_id}/{rel}".rstrip("/")


def stage_release(store: LocalRunStore, run_id: str) -> StagingManifest:
    """Hard-link the run's published files and its latest TRO (written now if the run has none yet)
    under staging/{run_id}/, with the hashes the steps recorded when they wrote them (promotion
    re-verifies every one against the TRO before anything is published)."""
    recorded = {rel: digest for step in step_graph.STEP_ORDER if (record := read_record(store, run_id, step))
                for rel, digest in record.outputs.items()}
    missing = [rel for rel in stages.AREAS_BY_PATH if rel not in recorded or not store.path(store.run_key(run_id, rel)).is_file()]
    if missing:
        raise RunStoreError(f"run {run_id} has {len(missing)} of its area files missing (e.g. {missing[0]}): nothing staged")
    files = {}
    for run_rel, digest in recorded.items():
        rel = release_path(run_rel)
        if rel is not None:
            files[rel] = (store.path(store.run_key(run_id, run_rel)), digest)
    tro = seal_tro(store, run_id)  # staging is the run's last step: its TRO is written by then
    files[TRO_NAME] = (tro, sha256_file(tro))
    manifest = StagingManifest(run_id=run_id, files={rel: digest for rel, (_, digest) in sorted(files.items())})
    for rel, (source, digest) in files.items():
        target = store.path(staging_key(run_id, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and (os.path.samefile(source, target) or sha256_file(target) == digest):
            continue
        # Staged again after a rebuild: the name now stands for the newer bytes (the run's TRO has a
        # new revision), swapped in atomically.
        incoming = target.with_name(f".{target.name}.{os.getpid()}.staging")
        link_or_copy(source, incoming)
        os.replace(incoming, target)
    write_bytes_atomic(store.path(staging_key(run_id, STAGING_MANIFEST)), manifest.model_dump_json(indent=2).encode())
    return manifest


def read_staging(store: LocalRunStore, run_id: str) -> StagingManifest:
    key = staging_key(run_id, STAGING_MANIFEST)
    if not store.exists(key):
        raise PromotionRefused(f"run {run_id} is not staged: materialize staged_release for it first")
    return StagingManifest.model_validate_json(store.read_bytes(key))


def under_release_lock(transition: Callable[..., Result]) -> Callable[..., Result]:
    """`transition(store, ...)` run holding the store's release lock: its checks and its writes (the
    registry, the run's meta.json) with no other promotion, rollback or clean in between."""

    @functools.wraps(transition)
    def locked(store: LocalRunStore, *args, **kwargs) -> Result:
        with store.release_lock():
            return transition(store, *args, **kwargs)

    return locked


def check_promotable(store: LocalRunStore, run_id: str, version: str, registry: RegistryBackend, allow_dirty: bool) -> StagingManifest:
    """Every refusal is a one-line PromotionRefused; nothing is written by a refusal."""
    validate_version(version)
    try:
        meta = store.read_meta(run_id)
    except RunStoreError as exc:
        raise PromotionRefused(str(exc)) from None
    if meta.status is RunStatus.promoted:
        raise PromotionRefused(f"run {run_id} is already promoted as {meta.promotion.version if meta.promotion else 'a release'}"
                               ": a run is promoted once")
    if meta.status is not RunStatus.completed:
        raise PromotionRefused(f"run {run_id} is {meta.status.value}: only a completed run can be promoted")
    if meta.dirty and not allow_dirty:
        raise PromotionRefused(f"run {run_id} was made from a dirty work tree (diff {meta.diff_sha256[:12]}); "
                               "pass --allow-dirty to promote it anyway")
    if any(entry.version == version for entry in registry.read().versions):
        raise PromotionRefused(f"version {version} is already in the registry: versions are never rewritten")
    report = verify_run(store, run_id)
    if not report.ok:
        raise PromotionRefused(f"run {run_id} does not verify against its TRO: {report.lines()[0]}")
    staged = read_staging(store, run_id)
    for rel, digest in staged.files.items():
        path = store.path(staging_key(run_id, rel))
        if not path.is_file() or sha256_file(path) != digest:
            raise PromotionRefused(f"staged file {rel} of run {run_id} does not match its manifest")
    return staged


@under_release_lock
def promote(
    store: LocalRunStore,
    run_id: str,
    version: str,
    publishers: dict[str, Publisher],
    registry: RegistryBackend,
    allow_dirty: bool = False,
    ledger: GitLedger | None = None,
) -> VersionManifest:
    """Publish a staged, verified run as `version` on every backend, then register it (and record it
    in `ledger`, else the configured one). The store's release lock covers the checks through the
    registry write and the run's transition to promoted: of concurrent promotions of a run, or of
    one version, exactly one gets through and the others are refused by the checks."""
    staged = check_promotable(store, run_id, version, registry, allow_dirty)
    ledger = ledger or configured_ledger(store.root)
    try:  # one model per release: refused, with nothing written, where the run's steps ran two
        model = model_package(run_id, run_records(store, run_id))
    except RunStoreError as exc:
        raise PromotionRefused(str(exc)) from None
    files = {rel: store.path(staging_key(run_id, rel)) for rel in staged.files}
    files[RELEASE_TRO] = write_release_tro(store, run_id, version, staged.files, TRO_NAME, model,
                                           store.path(f"releases/{version}/{RELEASE_TRO}"))
    return publish_and_register(store, run_id, version, files, publishers, registry, tro_path=f"runs/{run_id}/{TRO_NAME}",
                                tro_sha256=staged.files[TRO_NAME], ledger=ledger, policyengine_us=policyengine_us_build(model))


def publish_and_register(
    store: LocalRunStore,
    run_id: str,
    version: str,
    files: dict[str, Path],
    publishers: dict[str, Publisher],
    registry: RegistryBackend,
    tro_path: str,
    tro_sha256: str,
    roll_back_version: str | None = None,
    ledger: GitLedger | None = None,
    policyengine_us: PolicyEngineUsBuild | None = None,
) -> VersionManifest:
    """All-or-nothing: the registry entry is added only after every backend published; the ledger
    records the version once it is registered. Callers hold the store's release lock.
    `policyengine_us`: the model the published files' run ran, where it is known."""
    meta = store.read_meta(run_id)
    state = PromotionState(version=version)
    results = {}
    for name, publisher in publishers.items():
        try:
            results[name] = publisher.publish(version, files)
            state.published[name] = results[name].location
        except Exception as exc:  # any backend failure stops the promotion before the registry
            state.failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            break
    if roll_back_version is None:
        store.update_meta(run_id, lambda m: setattr(m, "promotion", state))
    if state.failed:
        where = ", ".join(f"{k}: {v}" for k, v in state.published.items()) or "nowhere"
        raise PromotionFailed(
            f"promotion of {run_id} as {version} failed on {', '.join(state.failed)} ({next(iter(state.failed.values()))}); "
            f"registry unchanged; already published: {where}; run the promotion again to complete it"
        )
    entry = VersionManifest(
        version=version,
        created_at=utcnow(),
        hf=next((r.hf for r in results.values() if r.hf), None),
        gcs=next((r.gcs for r in results.values() if r.gcs), None),
        special_operation="roll-back" if roll_back_version else None,
        roll_back_version=roll_back_version,
        run_id=run_id,
        diagnostics_path=f"production/{version}/{stages.DIAGNOSTICS}",
        git_sha=meta.sha,
        env_id=meta.env_id,
        config_hash=meta.config_hash,
        tro_path=tro_path,
        tro_sha256=tro_sha256,
        policyengine_us=policyengine_us,
    )
    try:
        registry.add(entry)
    except DuplicateVersion as exc:
        raise PromotionRefused(str(exc)) from None
    if roll_back_version is None:
        store.update_meta(run_id, lambda m: m.transition(RunStatus.promoted))
    if ledger is not None:
        event = f"rollback {version} to the files of {roll_back_version}" if roll_back_version else f"promote {version}"
        ledger.record(release_record_files(store, entry, files.get(RELEASE_TRO)), f"{event} (run {run_id})")
    return entry


def release_record_files(store: LocalRunStore, entry: VersionManifest, release_tro: Path | None) -> dict[str, bytes]:
    """What the ledger keeps of a release (ledger path -> bytes): its registry entry, its release TRO
    and the meta.json of its run."""
    files = {f"releases/{entry.version}/registry_entry.json": entry.model_dump_json(indent=2).encode(),
             store.meta_key(entry.run_id): store.read_bytes(store.meta_key(entry.run_id))}
    if release_tro is not None:
        files[f"releases/{entry.version}/{RELEASE_TRO}"] = release_tro.read_bytes()
    return files


@under_release_lock
def rollback(
    store: LocalRunStore,
    to_version: str,
    as_version: str,
    publishers: dict[str, Publisher],
    registry: RegistryBackend,
    production_root: Path,
    ledger: GitLedger | None = None,
) -> VersionManifest:
    """A rollback is a release: `as_version` publishes exactly the files of `to_version` its release
    TRO lists (and is recorded in `ledger`, else the configured one), once that copy verifies."""
    validate_version(as_version)
    versions = {entry.version: entry for entry in registry.read().versions}
    if to_version not in versions:
        raise PromotionRefused(f"cannot roll back to {to_version}: it is not in the registry")
    if as_version in versions:
        raise PromotionRefused(f"version {as_version} is already in the registry: versions are never rewritten")
    source = production_root / to_version
    if not source.is_dir():
        raise PromotionRefused(f"cannot roll back to {to_version}: its files are not at {source}")
    report = verify_production(store, versions, to_version, production_root)
    if not report.ok:
        raise PromotionRefused(f"cannot roll back to {to_version}: its production copy does not verify: {report.lines()[0]}")
    ledger = ledger or configured_ledger(store.root)
    listed = release_files(store, versions, to_version)
    files = {rel: source / rel for rel in sorted(listed)}
    old = versions[to_version]
    return publish_and_register(store, old.run_id, as_version, files, publishers, registry, tro_path=old.tro_path,
                                tro_sha256=old.tro_sha256, roll_back_version=to_version, ledger=ledger,
                                policyengine_us=old.policyengine_us)


def release_tro_path(store: LocalRunStore, versions: dict[str, VersionManifest], version: str) -> Path:
    """The store's release TRO of `version`: a rollback publishes the TRO of the release it rolls
    back to, so follow roll_back_version to the promotion that wrote one."""
    while (entry := versions[version]).roll_back_version is not None and entry.roll_back_version in versions:
        version = entry.roll_back_version
    return store.path(f"releases/{version}/{RELEASE_TRO}")


def release_files(store: LocalRunStore, versions: dict[str, VersionManifest], version: str) -> list[str]:
    """The paths a published copy of `version` holds: what its release TRO lists, and that TRO."""
    tro_path = release_tro_path(store, versions, version)
    return [*located(read_tro(tro_path), RELEASE_ARRANGEMENT_ID), RELEASE_TRO]


def verify_production(
    store: LocalRunStore, versions: dict[str, VersionManifest], version: str, production_root: Path
) -> VerifyReport:
    """The production copy of a registered version (production_root/{version}/) against its release
    TRO and the run TRO its registry entry names."""
    entry = versions[version]
    return verify_release(production_root / version, release_tro_path(store, versions, version), entry.run_id,
                          entry.tro_sha256)


def referenced_runs(store: LocalRunStore, registries: list[RegistryBackend]) -> set[str]:
    """Every run a registry entry names or a TRO under production/{version}/ names (a release's TRO
    and the run TRO it publishes). A file there that cannot be read refuses: clean cannot tell
    which run it publishes."""
    referenced = {entry.run_id for registry in registries for entry in registry.read().versions}
    for tro in (tro for version in published_versions(store) for tro in sorted(version.glob("*.jsonld"))):
        try:  # only the run ids: any TRO that names one (a release's, the run's it publishes) will do
            graph = json.loads(tro.read_bytes())["@graph"]
            referenced |= {node["pe:runId"] for node in graph if "pe:runId" in node}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CleanRefused(f"cannot tell which run {tro} publishes ({type(exc).__name__}): nothing removed") from None
    return referenced


def published_versions(store: LocalRunStore) -> list[Path]:
    """What production/ holds by version (a hidden name, like the publisher's .incoming, is none)."""
    production = store.path(PRODUCTION)
    return sorted(p for p in production.iterdir() if not p.name.startswith(".")) if production.is_dir() else []


@under_release_lock
def clean(store: LocalRunStore, registry: RegistryBackend, keep: int) -> list[str]:
    """Remove runs beyond the newest `keep` that are neither running nor promoted and that no registry
    (the configured one and the store's own) or production/ refers to; return their ids. Under the
    release lock, so no promotion lands in between; refuses, removing nothing, where the registry is
    unreadable, or empty while production/ holds versions or a run is promoted."""
    if keep < 0:
        raise ValueError(f"--keep {keep}: expected a number of runs >= 0")
    settle_orphans(store)  # a run whose orchestrator died is failed (removable), not running
    registries = [registry] + ([] if isinstance(registry, LocalRegistry) else [LocalRegistry.in_store(store.root)])
    runs = store.list_runs()
    published = [version.name for version in published_versions(store)]
    promoted = [m.run_id for m in runs if m.status is RunStatus.promoted]
    if (published or promoted) and not any(r.read().versions for r in registries):
        shown = f"production/ holds {', '.join(published)}" if published else f"run {promoted[0]} is promoted"
        raise CleanRefused(f"the version registry is missing or empty while {shown}: nothing removed")
    referenced = referenced_runs(store, registries)

    def removable(meta: RunMeta) -> bool:
        return meta.status not in KEPT_STATUSES and meta.run_id not in referenced

    candidates = [m.run_id for m in runs[: max(len(runs) - keep, 0)] if removable(m)]
    removed = [run_id for run_id in candidates if store.remove_run(run_id, removable)]
    for run_id in removed:
        shutil.rmtree(store.path(staging_key(run_id)), ignore_errors=True)
        shutil.rmtree(store.path(f"{LINEAGE_DIR}/{run_id}"), ignore_errors=True)
    return removed
