"""The run's Transparent Research Object (TROV 0.1): what went in, what came out, and how it was made.

The TRO is built from what the run already recorded (meta.json, steps/*.json, whose raw_inputs are
the hashes of the raw input bytes each step read), so writing it re-hashes nothing large;
`verify_run` is where every file is hashed again, over every revision of the TRO. Each revision names
the sha256 of the one before it, so a chain cannot be re-ordered or a revision swapped in unnoticed.
The layout is the one tro-utils 0.5.2 reads and writes (one node in `@graph`, the fingerprint's
hash under `trov:hash`, performances bound to arrangements through `trov:ArrangementBinding`),
so that an independent tool agrees with us on what a run contains.
It is also the one PolicyEngine's published TRO schema accepts (`@context` an array; `pe:emittedIn`
and `pe:dataBuildId` on each performance) and it meets TRACE's tro-checks LINKABLE-TRO tier: an
`@base` of its own per TRO and an `@id` on every node, so no two TROs' identifiers collide.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Annotated, Iterable, Literal

import gnupg
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, computed_field, field_validator

from pipeline_assets.identity import package_version
from pipeline_assets.reuse import StepRecord, files_verify, read_record, rebuild_records
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.steps.geography import raw_inputs_dir
from pipeline_assets.steps.results import MODEL_PACKAGE  # the StepRecord.environment key a step that ran a model records it under
from resources.files import sha256_file, write_bytes_atomic
from resources.run_store import SEALED, LocalRunStore, RunStoreError, StepTiming, utcnow

TROV = "https://w3id.org/trace/trov/0.1#"
SCHEMA_ORG = "https://schema.org/"
PE = "https://policyengine.org/trace/0.1#"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
CONTEXT = {"trov": TROV, "schema": SCHEMA_ORG, "pe": PE, "rdfs": RDFS}  # the prefixes; each TRO adds its @base
TRO_BASE_VARIABLE = "PIPELINE_TRO_BASE"
DEFAULT_TRO_BASE = "https://policyengine.org/usdata-pipeline/"
# tro-checks' TRACE-JSON-LD rules for an @base (base-web-scheme, base-simple-url): http(s), a host, no
# user info, query or fragment, path segments of letters, digits, . _ - that begin and end with a
# letter or digit, and a final /.
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_TRO_BASE = re.compile(rf"https?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{{1,5}})?/(?:{_SEGMENT}/)*")
TRO_BASE_FORM = ("an absolute http(s) IRI naming a host, with no user, query or fragment, path segments of letters, "
                 f"digits, '.', '_' and '-' (each beginning and ending with a letter or digit) and a final '/', e.g. {DEFAULT_TRO_BASE}")
GITHUB_ACTIONS_VARIABLE = "GITHUB_ACTIONS"  # "true" in a GitHub Actions job
TRS_ID = "pe:usdata-pipeline"  # tro-utils requires a TRS @id that is an IRI outside the trov: prefix
COMPOSITION_ID = "composition/1"
INPUTS_ID = "arrangement/0"
OUTPUTS_ID = "arrangement/1"
RELEASE_ARRANGEMENT_ID = "arrangement/release"
TRO_PREFIX = "trace.tro."
TRO_NAME = f"{TRO_PREFIX}jsonld"
SIGNATURE_SUFFIX = ".sig"
# Not artifacts: meta.json changes on promotion, and a TRO (TRO_PREFIX*) cannot list itself.
NOT_ARTIFACTS = ("meta.json",)
MIME_TYPES = {
    ".db": "application/vnd.sqlite3",
    ".h5": "application/x-hdf5",
    ".npy": "application/octet-stream",
    ".csv": "text/csv",
    ".json": "application/json",
    ".gz": "application/gzip",
}
GPG_KEY_VARIABLE = "PIPELINE_GPG_KEY"


class TroConfigError(ValueError):
    """A TRO setting that would make every TRO written with it wrong; checked before a run starts."""


def is_tro_base(value: str) -> bool:
    return bool(_TRO_BASE.fullmatch(value))


def tro_base() -> str:
    """The IRI under which every TRO's own @base is minted: PIPELINE_TRO_BASE, else the project's."""
    value = os.environ.get(TRO_BASE_VARIABLE) or DEFAULT_TRO_BASE
    if not is_tro_base(value):
        raise TroConfigError(f"{TRO_BASE_VARIABLE}={value!r}: expected {TRO_BASE_FORM}")
    return value


def _base_segment(name: str) -> str:
    """A run_id or a version as one @base path segment: a segment cannot hold semver's '+', so it is
    written '_', which no version holds otherwise (the mapping stays one-to-one)."""
    return name.replace("+", "_")


def run_tro_base(run_id: str, revision: int) -> str:
    """Each revision of each run's TRO resolves its relative @ids against its own base."""
    return f"{tro_base()}runs/{_base_segment(run_id)}/v{revision}/"


def release_tro_base(version: str) -> str:
    return f"{tro_base()}releases/{_base_segment(version)}/"


def emitted_in() -> Literal["local", "github-actions"]:
    """Where this TRO is being written, as PolicyEngine's schema names it: github-actions only when
    GitHub Actions says so (GITHUB_ACTIONS=true); anything else is local."""
    return "github-actions" if os.environ.get(GITHUB_ACTIONS_VARIABLE) == "true" else "local"

Timestamp = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str)]


# --- the records written: JSON-LD nodes, their compact IRIs as aliases ---------------------------
class Node(BaseModel):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class Ref(Node):
    id: str = Field(alias="@id")


class Hash(Node):
    id: str | None = Field(None, alias="@id")  # None only in TROs written before @ids on every node
    algorithm: str = Field("sha256", alias="trov:hashAlgorithm")
    value: str = Field(alias="trov:hashValue")


class ResearchArtifact(Node):
    id: str = Field(alias="@id")
    type: Literal["trov:ResearchArtifact"] = Field("trov:ResearchArtifact", alias="@type")
    hash: Hash = Field(alias="trov:hash")
    mime_type: str = Field(alias="trov:mimeType")


class CompositionFingerprint(Node):
    id: str = Field("fingerprint", alias="@id")
    type: Literal["trov:CompositionFingerprint"] = Field("trov:CompositionFingerprint", alias="@type")
    hash: Hash = Field(alias="trov:hash")


class ArtifactComposition(Node):
    id: str = Field(COMPOSITION_ID, alias="@id")
    type: Literal["trov:ArtifactComposition"] = Field("trov:ArtifactComposition", alias="@type")
    artifacts: list[ResearchArtifact] = Field(alias="trov:hasArtifact")
    fingerprint: CompositionFingerprint = Field(alias="trov:hasFingerprint")


class ArtifactLocation(Node):
    id: str = Field(alias="@id")
    type: Literal["trov:ArtifactLocation"] = Field("trov:ArtifactLocation", alias="@type")
    artifact: Ref = Field(alias="trov:artifact")
    path: str = Field(alias="trov:path")


class ArtifactArrangement(Node):
    id: str = Field(alias="@id")
    type: Literal["trov:ArtifactArrangement"] = Field("trov:ArtifactArrangement", alias="@type")
    comment: str = Field(alias="rdfs:comment")
    locations: list[ArtifactLocation] = Field(alias="trov:hasArtifactLocation")


class ArrangementBinding(Node):
    id: str = Field(alias="@id")
    type: Literal["trov:ArrangementBinding"] = Field("trov:ArrangementBinding", alias="@type")
    arrangement: Ref = Field(alias="trov:arrangement")


class TrustedResearchSystem(Node):
    id: str = Field(TRS_ID, alias="@id")
    type: list[str] = Field(["trov:TrustedResearchSystem", "schema:Organization"], alias="@type")
    name: str = Field(alias="schema:name")
    public_key: str | None = Field(None, alias="trov:publicKey")


class ModelPackage(BaseModel):
    """The simulation model (policyengine-us) a step ran, when known. The hook for the model's step: it
    records `ModelPackage(...).model_dump(exclude_none=True)` in its StepRecord.environment under
    MODEL_PACKAGE; that step's performance then names it (pe:builtWithModel*), and the release TRO
    and the registry entry (policyengine_us) carry it on. A step that records none emits nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)  # the distribution, e.g. policyengine-us
    version: str = Field(min_length=1)
    locked_version: str | None = None  # the version the model's environment pins, where it pins one
    git_sha: str | None = None  # the model's source commit, where it was installed from git


class Performance(Node):
    """What PolicyEngine's schema asks of every performance: where the TRO was emitted and which data
    build it describes (the run_id), and the model that build ran, when it ran one."""

    id: str = Field(alias="@id")
    type: Literal["trov:TrustedResearchPerformance"] = Field("trov:TrustedResearchPerformance", alias="@type")
    comment: str = Field(alias="rdfs:comment")
    conducted_by: Ref = Field(Ref(id=TRS_ID), alias="trov:wasConductedBy")
    started_at: Timestamp | None = Field(None, alias="trov:startedAtTime")
    ended_at: Timestamp | None = Field(None, alias="trov:endedAtTime")
    accessed: ArrangementBinding | None = Field(None, alias="trov:accessedArrangement")
    contributed: ArrangementBinding = Field(alias="trov:contributedToArrangement")
    # None only in TROs written before PolicyEngine's schema was met:
    emitted_in: Literal["local", "github-actions"] | None = Field(None, alias="pe:emittedIn")
    data_build_id: str | None = Field(None, alias="pe:dataBuildId")
    built_with_name: str | None = Field(None, alias="pe:builtWithModelPackageName")
    built_with_version: str | None = Field(None, alias="pe:builtWithModelVersion")
    built_with_git_sha: str | None = Field(None, alias="pe:builtWithModelGitSha")


def _built_with(model: ModelPackage | None) -> dict[str, str | None]:
    """A performance's pe:builtWithModel* fields: none where no model is known."""
    if model is None:
        return {}
    return {"built_with_name": model.name, "built_with_version": model.version, "built_with_git_sha": model.git_sha}


class PublicationPerformance(Performance):
    """A release TRO's one performance: the promotion that published the run's files."""

    model_config = ConfigDict(extra="forbid")


class TrustedResearchPerformance(Performance):
    """One step of the run, with the runtime environment it ran in as pe: properties."""

    accessed: ArrangementBinding = Field(alias="trov:accessedArrangement")
    step: str = Field(alias="pe:step")
    code_version: str = Field(alias="pe:codeVersion")
    env_id: str = Field(alias="pe:envId")
    config_hash: str = Field(alias="pe:configHash")
    reuse: str = Field(alias="pe:reuse")
    reused_from: str | None = Field(None, alias="pe:reusedFrom")
    reused_parts: str | None = Field(None, alias="pe:reusedParts")  # JSON text, part -> run: a step reused in part
    container_image_digest: str | None = Field(None, alias="pe:containerImageDigest")
    python_version: str | None = Field(None, alias="pe:pythonVersion")
    library_versions: str | None = Field(None, alias="pe:libraryVersions")  # JSON text: names are not IRIs
    cloud_region: str | None = Field(None, alias="pe:cloudRegion")
    compute_pool: str | None = Field(None, alias="pe:computePool")
    instance_id: str | None = Field(None, alias="pe:instanceId")
    gpu_model: str | None = Field(None, alias="pe:gpuModel")  # where a GPU was present (a cuda fit's)
    ci_git_sha: str | None = Field(None, alias="pe:ciGitSha")
    ci_run_url: str | None = Field(None, alias="pe:ciRunUrl")


class TransparentResearchObject(Node):
    id: str = Field("tro", alias="@id")
    type: list[str] = Field(["trov:TransparentResearchObject", "schema:CreativeWork"], alias="@type")
    name: str = Field(alias="schema:name")
    description: str = Field(alias="schema:description")
    date_created: Timestamp = Field(alias="schema:dateCreated")
    vocabulary_version: str = Field("0.1", alias="trov:vocabularyVersion")
    assembled_by: TrustedResearchSystem = Field(alias="trov:wasAssembledBy")
    composition: ArtifactComposition = Field(alias="trov:hasComposition")
    arrangements: list[ArtifactArrangement] = Field(alias="trov:hasArrangement")
    performances: list[TrustedResearchPerformance | PublicationPerformance] = Field(alias="trov:hasPerformance")
    run_id: str = Field(alias="pe:runId")
    git_sha: str = Field(alias="pe:gitSha")
    branch: str | None = Field(None, alias="pe:branch")
    dirty: bool = Field(alias="pe:dirty")
    diff_sha256: str | None = Field(None, alias="pe:diffSha256")
    env_id: str | None = Field(None, alias="pe:envId")
    config_hash: str | None = Field(None, alias="pe:configHash")
    version: str | None = Field(None, alias="pe:version")  # release TROs only
    run_tro: str | None = Field(None, alias="pe:runTro")  # release TROs: the run's TRO they publish
    previous_revision: str | None = Field(None, alias="pe:previousRevisionSha256")  # revisions 2, 3, ...


class Context(Node):
    """The inline @context: the prefixes, and the @base the TRO's relative @ids resolve against."""

    model_config = ConfigDict(extra="forbid")
    base: str | None = Field(None, alias="@base")  # None only in TROs written before @base was
    trov: Literal[TROV] = TROV
    schema_org: Literal[SCHEMA_ORG] = Field(SCHEMA_ORG, alias="schema")
    pe: Literal[PE] = PE
    rdfs: Literal[RDFS] = RDFS


class TroDocument(Node):
    context: list[Context] = Field(alias="@context", min_length=1, max_length=1)  # an array: PolicyEngine's schema
    graph: list[TransparentResearchObject] = Field(alias="@graph", min_length=1, max_length=1)

    @field_validator("context", mode="before")
    @classmethod
    def _one_object(cls, value):
        """TROs written before the array read as they are."""
        return [value] if isinstance(value, dict) else value


# --- building ------------------------------------------------------------------------------------
def composition_fingerprint(hash_values: Iterable[str]) -> str:
    """sha256 of the sorted artifact hashes concatenated: tro-utils' CompositionFingerprint.compute."""
    return hashlib.sha256("".join(sorted(hash_values)).encode()).hexdigest()


def mime_type(path: str) -> str:
    return MIME_TYPES.get(Path(path).suffix, "application/octet-stream")


def raw_inputs_of(run_id: str, records: list[StepRecord]) -> dict[str, str]:
    """{"raw_inputs/<name>": sha256} of the raw input bytes the run's steps read, from their records.
    Two steps that read different bytes under one name cannot be described by one arrangement: refused."""
    read: dict[str, tuple[str, str]] = {}
    for record in records:
        for rel, digest in record.raw_inputs.items():
            step, seen = read.setdefault(rel, (record.step, digest))
            if seen != digest:
                raise RunStoreError(
                    f"run {run_id} read two versions of {rel}: sha256 {seen} in step {step}, {digest} in step {record.step}"
                )
    return {rel: digest for rel, (_, digest) in sorted(read.items())}


def run_files(store: LocalRunStore, run_id: str, records: list[StepRecord]) -> dict[str, str]:
    """Every file of the run (path relative to the run directory -> sha256).

    A step's outputs carry the hash its record took when it wrote them (a file changed since is for
    `verify_run` to find); the few files no step records (the step records themselves, the areas
    manifest) are hashed now.
    """
    files = {rel: digest for record in records for rel, digest in record.outputs.items()}
    prefix = store.run_key(run_id) + "/"
    for key in store.list(store.run_key(run_id)):
        rel = key.removeprefix(prefix)
        if rel not in files and rel not in NOT_ARTIFACTS and not rel.startswith(TRO_PREFIX):
            files[rel] = sha256_file(store.path(key))
    return dict(sorted(files.items()))


def _compose(arrangements: dict[str, tuple[str, dict[str, str]]]) -> tuple[ArtifactComposition, list[ArtifactArrangement]]:
    """One artifact per distinct hash (ids in order of first appearance), one location per path."""
    artifacts: dict[str, ResearchArtifact] = {}
    built = []
    for arrangement_id, (comment, files) in arrangements.items():
        locations = []
        for index, (path, digest) in enumerate(files.items()):
            if digest not in artifacts:
                artifact_id = f"{COMPOSITION_ID}/artifact/{len(artifacts)}"
                artifacts[digest] = ResearchArtifact(
                    id=artifact_id, hash=Hash(id=f"{artifact_id}/hash", value=digest), mime_type=mime_type(path)
                )
            locations.append(
                ArtifactLocation(id=f"{arrangement_id}/location/{index}", artifact=Ref(id=artifacts[digest].id), path=path)
            )
        built.append(ArtifactArrangement(id=arrangement_id, comment=comment, locations=locations))
    fingerprint = CompositionFingerprint(hash=Hash(id="fingerprint/hash", value=composition_fingerprint(artifacts.keys())))
    return ArtifactComposition(artifacts=list(artifacts.values()), fingerprint=fingerprint), built


def _binding(performance_id: str, index: int, arrangement_id: str) -> ArrangementBinding:
    return ArrangementBinding(id=f"{performance_id}/binding/{index}", arrangement=Ref(id=arrangement_id))


def step_model(record: StepRecord) -> ModelPackage | None:
    """The model a step recorded it ran (MODEL_PACKAGE in its environment), if any."""
    recorded = record.environment.get(MODEL_PACKAGE)
    if recorded is None:
        return None
    try:
        return ModelPackage.model_validate(recorded)
    except ValidationError as exc:
        raise RunStoreError(f"step {record.step}: unreadable {MODEL_PACKAGE} in its record: "
                            f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


def model_package(run_id: str, records: list[StepRecord]) -> ModelPackage | None:
    """The model the run's steps ran, if any; two different ones are refused: a release is checked
    with one model, and naming either alone would misstate it."""
    found: dict[ModelPackage, str] = {}
    for record in records:
        if (model := step_model(record)) is not None:
            found.setdefault(model, record.step)
    if len(found) > 1:
        (first, step), (second, other) = list(found.items())[:2]
        raise RunStoreError(f"run {run_id} ran two models: {first.name} {first.version} in step {step}, "
                            f"{second.name} {second.version} in step {other}")
    return next(iter(found), None)


def run_records(store: LocalRunStore, run_id: str) -> list[StepRecord]:
    """The run's step records in step order, then the backfills of a completed run."""
    records = [record for step in STEP_ORDER if (record := read_record(store, run_id, step)) is not None]
    return records + rebuild_records(store, run_id)


def _performance(run_id: str, index: int, record: StepRecord, timing: StepTiming | None) -> TrustedResearchPerformance:
    """A step's performance. Steps with no upstream step read only raw inputs; the others read
    upstream files of the run. Times are the step record's (meta.json keeps only a step's latest
    timing, which a backfill replaces). Its data build is the run, a reused step's included: the TRO
    vouches for the run's files."""
    env = record.environment
    performance_id = f"trp/{index}"
    versions = env.get("library_versions")
    return TrustedResearchPerformance(
        id=performance_id,
        comment=f"step {record.step} ({record.reuse}{f' from {record.reused_from}' if record.reused_from else ''}"
                + "".join(f", {part} part reused from {run}" for part, run in sorted(record.reused_parts.items())) + ")",
        started_at=record.started_at or (timing.started_at if timing else None),
        ended_at=record.ended_at,
        accessed=_binding(performance_id, 0, OUTPUTS_ID if record.inputs else INPUTS_ID),
        contributed=_binding(performance_id, 1, OUTPUTS_ID),
        step=record.step,
        code_version=record.code_version,
        env_id=record.env_id,
        config_hash=record.config_hash,
        reuse=record.reuse,
        reused_from=record.reused_from,
        reused_parts=json.dumps(record.reused_parts, sort_keys=True) if record.reused_parts else None,
        container_image_digest=env.get("container_image_digest"),
        python_version=env.get("python_version"),
        library_versions=json.dumps(versions, sort_keys=True) if versions is not None else None,
        cloud_region=env.get("cloud_region"),
        compute_pool=env.get("compute_pool"),
        instance_id=env.get("instance_id"),
        gpu_model=env.get("gpu_model"),
        ci_git_sha=env.get("ci_git_sha"),
        ci_run_url=env.get("ci_run_url"),
        emitted_in=emitted_in(),
        data_build_id=run_id,
        **_built_with(step_model(record)),
    )


def build_tro(store: LocalRunStore, run_id: str, public_key: str | None = None, previous_revision: str | None = None,
              revision: int = 1) -> dict:
    """The run's TRO as a JSON-LD document; `public_key` (armored) is the signer's, when signing;
    `previous_revision` the sha256 of the revision this one follows, `revision` its number."""
    meta = store.read_meta(run_id)
    records = run_records(store, run_id)
    composition, arrangements = _compose({
        INPUTS_ID: ("raw inputs the steps read (paths relative to pipeline_assets/data/)", raw_inputs_of(run_id, records)),
        OUTPUTS_ID: (f"files of run {run_id} (paths relative to runs/{run_id}/)", run_files(store, run_id, records)),
    })
    tro = TransparentResearchObject(
        name=f"usdata-pipeline run {run_id}",
        description=f"US microdata release run {run_id} of {meta.sha}",
        date_created=utcnow(),
        assembled_by=TrustedResearchSystem(name=f"usdata-pipeline {package_version()}", public_key=public_key),
        composition=composition,
        arrangements=arrangements,
        performances=[_performance(run_id, i, r, meta.step_timings.get(r.step)) for i, r in enumerate(records)],
        run_id=run_id,
        git_sha=meta.sha,
        branch=meta.branch,
        dirty=meta.dirty,
        diff_sha256=meta.diff_sha256,
        env_id=meta.env_id,
        config_hash=meta.config_hash,
        previous_revision=previous_revision,
    )
    return TroDocument(context=[Context(base=run_tro_base(run_id, revision))], graph=[tro]).model_dump(mode="json", exclude_none=True)


def build_release_tro(store: LocalRunStore, run_id: str, version: str, files: dict[str, str], run_tro: str,
                      model: ModelPackage | None = None) -> dict:
    """The TRO of a release: the published files (path in the release -> sha256), pointing at the
    TRO of the run they come from (which is itself one of the files). Its one performance is the
    publication, started as the TRO is assembled (its end is not known yet, so none is claimed);
    `model` is the model the run ran (model_package), as PolicyEngine's release TROs name it."""
    meta = store.read_meta(run_id)
    composition, arrangements = _compose({RELEASE_ARRANGEMENT_ID: (f"release {version} (paths relative to production/{version}/)", files)})
    publication = PublicationPerformance(
        id="trp/0",
        comment=f"publication of run {run_id} as release {version}",
        started_at=utcnow(),
        contributed=_binding("trp/0", 0, RELEASE_ARRANGEMENT_ID),
        emitted_in=emitted_in(),
        data_build_id=run_id,
        **_built_with(model),
    )
    tro = TransparentResearchObject(
        id="release",
        name=f"usdata-pipeline release {version}",
        description=f"release {version}: the files of run {run_id} promoted",
        date_created=utcnow(),
        assembled_by=TrustedResearchSystem(name=f"usdata-pipeline {package_version()}"),
        composition=composition,
        arrangements=arrangements,
        performances=[publication],
        run_id=run_id,
        git_sha=meta.sha,
        branch=meta.branch,
        dirty=meta.dirty,
        diff_sha256=meta.diff_sha256,
        env_id=meta.env_id,
        config_hash=meta.config_hash,
        version=version,
        run_tro=run_tro,
    )
    return TroDocument(context=[Context(base=release_tro_base(version))], graph=[tro]).model_dump(mode="json", exclude_none=True)


def canonical_bytes(doc: dict) -> bytes:
    """The bytes that are written and signed (tro-utils signs the same serialisation)."""
    return json.dumps(doc, indent=2, sort_keys=True).encode()


# --- signing -------------------------------------------------------------------------------------
class SigningError(RuntimeError):
    """gpg could not sign or export the configured key."""


class GpgSigner:
    """Detached ASCII-armored signatures by the local gpg (through python-gnupg), offline; the secret
    key never leaves the keyring, and only the public key goes into the TRO (as trov:publicKey)."""

    def __init__(self, key_id: str, gnupg_home: str | None = None):
        self.key_id = key_id
        self.gnupg_home = gnupg_home

    def _failed(self, action: str, stderr: str | None) -> SigningError:
        said = [line for line in (stderr or "").strip().splitlines() if not line.startswith("[GNUPG:]")]
        return SigningError(f"gpg could not {action} with key {self.key_id}: {said[-1] if said else 'no output'}")

    def sign(self, data: bytes) -> bytes:
        # --local-user, not python-gnupg's keyid (gpg's --default-key falls back to another secret key)
        signed = gpg(self.gnupg_home).sign(data, detach=True, clearsign=False, binary=False,
                                           extra_args=["--yes", "--pinentry-mode", "loopback", "--local-user", self.key_id])
        if not signed.data:
            raise self._failed("sign", signed.stderr)
        return signed.data

    def public_key(self) -> str:
        key = gpg(self.gnupg_home).export_keys(self.key_id)
        if not key:
            raise self._failed("export the public key", f"no public key {self.key_id} in the keyring")
        return key


@functools.lru_cache(maxsize=16)
def gpg(gnupg_home: str | None) -> gnupg.GPG:
    """python-gnupg's handle on the keyring at `gnupg_home` (None: gpg's own default), made once: making
    one runs `gpg --version`, and verifying a store checks every revision of every sealed run."""
    return gnupg.GPG(gnupghome=gnupg_home)


def signer_from_environment() -> GpgSigner | None:
    """The signer PIPELINE_GPG_KEY (and GNUPGHOME) configure; None when signing is not configured."""
    key_id = os.environ.get(GPG_KEY_VARIABLE)
    return GpgSigner(key_id, os.environ.get("GNUPGHOME")) if key_id else None


# --- writing -------------------------------------------------------------------------------------
def tro_name(revision: int) -> str:
    return TRO_NAME if revision == 1 else TRO_NAME.replace(".jsonld", f".v{revision}.jsonld")


def tro_revisions(store: LocalRunStore, run_id: str) -> list[Path]:
    """The run's TRO files, oldest first."""
    revisions = []
    while (path := store.path(store.run_key(run_id, tro_name(len(revisions) + 1)))).is_file():
        revisions.append(path)
    return revisions


def write_tro(store: LocalRunStore, run_id: str, signer: GpgSigner | None = None) -> Path:
    """Write the run's TRO (and its signature); an existing TRO is never replaced, the new one is
    the next revision beside it, naming the sha256 of the one before. Signing happens first, so a
    signer that fails writes nothing."""
    revisions = tro_revisions(store, run_id)
    previous = sha256_file(revisions[-1]) if revisions else None
    data = canonical_bytes(build_tro(store, run_id, signer.public_key() if signer else None, previous, len(revisions) + 1))
    signature = signer.sign(data) if signer else None
    rel = tro_name(len(revisions) + 1)
    path = store.write_run_file(run_id, rel, data)
    if signature is not None:
        store.write_run_file(run_id, rel + SIGNATURE_SUFFIX, signature)
    return path


def seal_tro(store: LocalRunStore, run_id: str) -> Path:
    """The TRO of a run that has just completed: written (signed where PIPELINE_GPG_KEY is set) by
    whichever of settling the run and staging its release comes first, then kept as it is."""
    revisions = tro_revisions(store, run_id)
    return revisions[-1] if revisions else write_tro(store, run_id, signer_from_environment())


def write_release_tro(store: LocalRunStore, run_id: str, version: str, files: dict[str, str], run_tro: str,
                      model: ModelPackage | None, path: Path) -> Path:
    """The release's TRO at `path` (releases/{version}/), written once: a promotion run again after a
    failure keeps the one it wrote."""
    if not path.exists():
        write_bytes_atomic(path, canonical_bytes(build_release_tro(store, run_id, version, files, run_tro, model)))
    return path


def revise_tro(store: LocalRunStore, run_id: str) -> Path:
    """A new revision of the run's TRO, for what was added to a run after it was sealed (a verified
    rebuild of its areas, a reproduction's report). Every TRO the pipeline writes goes through this,
    `seal_tro` or `write_release_tro`."""
    return write_tro(store, run_id, signer_from_environment())


# --- verifying -----------------------------------------------------------------------------------
SignatureStatus = Literal["ok", "bad", "unverifiable", "missing", "other key"]


class Mismatch(BaseModel):
    path: str
    expected: str
    found: str  # the file's sha256, or "missing"


class VerifyReport(BaseModel):
    run_id: str
    tro: str | None = None  # the latest TRO revision checked (every one is), relative to its folder
    revisions_checked: int = 0
    artifacts_checked: int = 0  # artifact locations (files) re-hashed
    mismatches: list[Mismatch] = Field(default_factory=list)
    fingerprint_ok: bool = False  # every revision's
    signature: SignatureStatus | None = None  # None: the run was never signed; else the worst revision's
    problems: list[str] = Field(default_factory=list)  # what is wrong with the TROs themselves

    @computed_field
    @property
    def ok(self) -> bool:
        return self.tro is not None and self.fingerprint_ok and not self.mismatches and not self.problems

    def lines(self) -> list[str]:
        """One line per thing wrong."""
        return self.problems + [f"{m.path}: expected sha256 {m.expected}, found {m.found}" for m in self.mismatches]


@functools.lru_cache(maxsize=16)
def key_fingerprints(armored_key: str, gnupg_home: str | None = None) -> frozenset[str]:
    """The fingerprints (primary key and subkeys) of an armored public key, read without importing it."""
    return frozenset(fingerprint for key in gpg(gnupg_home).scan_keys_mem(armored_key)
                     for fingerprint in (key["fingerprint"], *(subkey[2] for subkey in key["subkeys"])))


def check_signature(
    data: Path, signature: Path, gnupg_home: str | None = None, signer_key: str | None = None
) -> SignatureStatus:
    """gpg's verdict on a detached signature: bad when the bytes changed, unverifiable without the key,
    other key when it is good but not by `signer_key` (armored), the key the TRO names."""
    if shutil.which("gpg") is None or (gnupg_home is not None and not Path(gnupg_home).is_dir()):
        return "unverifiable"  # no gpg, or no keyring (python-gnupg would create the directory)
    with open(signature, "rb") as handle:
        verdict = gpg(gnupg_home).verify_file(handle, data_filename=str(data), close_file=False)
    if not verdict.valid:
        return "bad" if verdict.status == "signature bad" else "unverifiable"
    if signer_key is None:
        return "ok"
    signed_by = {verdict.fingerprint, verdict.pubkey_fingerprint}  # the signing (sub)key and its primary key
    return "ok" if signed_by & key_fingerprints(signer_key, gnupg_home) else "other key"


def read_tro(path: Path) -> TransparentResearchObject:
    return TroDocument.model_validate_json(path.read_bytes()).graph[0]


def _fingerprint_problem(name: str, tro: TransparentResearchObject) -> str | None:
    recomputed = composition_fingerprint(artifact.hash.value for artifact in tro.composition.artifacts)
    if recomputed == tro.composition.fingerprint.hash.value:
        return None
    return (f"{name}: fingerprint {tro.composition.fingerprint.hash.value} does not match its artifacts "
            f"({recomputed}): the TRO was edited")


def located(tro: TransparentResearchObject, arrangement_id: str) -> dict[str, str]:
    """{path: sha256} of one arrangement of a TRO (empty when it has none by that id)."""
    hashes = {artifact.id: artifact.hash.value for artifact in tro.composition.artifacts}
    return {location.path: hashes.get(location.artifact.id, "unlisted")
            for arrangement in tro.arrangements if arrangement.id == arrangement_id
            for location in arrangement.locations}


class ChainCheck(BaseModel):
    """Every TRO revision of a run, checked in order without re-hashing the run's files."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    revisions: list[Path]
    readable: list[TransparentResearchObject]  # the revisions that parsed, in order
    fingerprints_ok: bool  # of every readable revision
    problems: list[str]
    signature: SignatureStatus | None


def check_chain(store: LocalRunStore, run_id: str, gnupg_home: str | None = None) -> ChainCheck:
    """Each revision readable, its fingerprint holding and naming the sha256 of the one before it; no
    TRO file outside the chain; and a run that was signed (a .sig, or a revision naming a
    trov:publicKey) signed in every revision, by the key its TROs name."""
    revisions = tro_revisions(store, run_id)
    run_dir = store.path(store.run_key(run_id))
    problems = [] if revisions else [f"no TRO: runs/{run_id}/{TRO_NAME} does not exist"]
    readable, parsed = [], {}
    previous: str | None = None
    fingerprints_ok = True
    for path in revisions:
        try:
            parsed[path] = tro = read_tro(path)
        except ValidationError as exc:
            problems.append(f"{path.name} is not a readable TRO: {str(exc).splitlines()[0]}")
        else:
            readable.append(tro)
            if (problem := _fingerprint_problem(path.name, tro)) is not None:
                fingerprints_ok = False
                problems.append(problem)
            if tro.previous_revision != previous:
                problems.append(f"{path.name}: names {tro.previous_revision or 'no'} previous revision, but the one "
                                f"before it has sha256 {previous or 'none'}: the chain was re-ordered or forged")
        previous = sha256_file(path)
    chained = {name for path in revisions for name in (path.name, path.name + SIGNATURE_SUFFIX)}
    problems += [f"{p.name}: a TRO file outside the revision chain of runs/{run_id}/"
                 for p in sorted(run_dir.glob(f"{TRO_PREFIX}*")) if p.name not in chained]
    keys = [tro.assembled_by.public_key for tro in readable if tro.assembled_by.public_key]
    signed = bool(keys) or any(path.with_name(path.name + SIGNATURE_SUFFIX).is_file() for path in revisions)
    worst: SignatureStatus | None = "ok" if signed else None
    for path in revisions if signed else []:
        named = parsed[path].assembled_by.public_key if path in parsed else None
        if named and named != keys[0]:
            problems.append(f"{path.name}: names another signing key than the run's first signed revision")
        signature = path.with_name(path.name + SIGNATURE_SUFFIX)
        status = "missing"
        if signature.is_file():
            status = check_signature(path, signature, gnupg_home, named or (keys[0] if keys else None))
        if status != "ok":
            worst = status if worst == "ok" else worst
            problems.append(f"{path.name}: signature {status} ({signature.name}); the run was signed")
    return ChainCheck(revisions=revisions, readable=readable, fingerprints_ok=fingerprints_ok, problems=problems,
                      signature=worst)


class _Rehasher:
    """Re-hashes each file once, however many revisions list it; records a mismatch once."""

    def __init__(self, report: VerifyReport):
        self.report = report
        self.hashes: dict[Path, str] = {}
        self.seen: set[tuple[str, str]] = set()

    def check(self, root: Path, path: str, expected: str) -> None:
        file = (root / path).resolve()
        if not file.is_relative_to(root.resolve()):
            self.report.problems.append(f"location {path} is outside {root.name}/")
            return
        if file not in self.hashes:
            self.hashes[file] = sha256_file(file) if file.is_file() else "missing"
            self.report.artifacts_checked += 1
        if self.hashes[file] != expected and (path, expected) not in self.seen:
            self.seen.add((path, expected))
            self.report.mismatches.append(Mismatch(path=path, expected=expected, found=self.hashes[file]))


def verify_run(store: LocalRunStore, run_id: str, gnupg_home: str | None = None) -> VerifyReport:
    """Check every TRO revision of the run in order (check_chain) and re-hash every file each lists."""
    store.read_meta(run_id)  # an unknown run is an error, not a failed verification
    chain = check_chain(store, run_id, gnupg_home)
    report = VerifyReport(
        run_id=run_id, tro=chain.revisions[-1].name if chain.revisions else None, revisions_checked=len(chain.revisions),
        fingerprint_ok=bool(chain.readable) and chain.fingerprints_ok,
        signature=chain.signature, problems=list(chain.problems),
    )
    roots = {INPUTS_ID: raw_inputs_dir().parent, OUTPUTS_ID: store.path(store.run_key(run_id))}
    rehash = _Rehasher(report)
    for tro in chain.readable:
        for arrangement in tro.arrangements:
            if arrangement.id not in roots:
                report.problems.append(f"TRO of run {run_id}: unknown arrangement {arrangement.id}")
                continue
            for path, expected in located(tro, arrangement.id).items():
                rehash.check(roots[arrangement.id], path, expected)
    return report


def verify_release(release_dir: Path, release_tro: Path, run_id: str, run_tro_sha256: str) -> VerifyReport:
    """A release's published copy against its TRO (`release_tro`, the store's): the TRO readable with
    its fingerprint holding, the copy published with it byte-identical, every file it lists re-hashed,
    the run TRO it names the one the registry entry names (`run_tro_sha256`), and no file in the copy
    that it does not list (a stray or a temporary file)."""
    report = VerifyReport(run_id=run_id, tro=release_tro.name)
    published_tro = release_dir / release_tro.name
    try:
        tro = read_tro(release_tro)
    except (OSError, ValidationError) as exc:
        report.problems.append(f"{release_tro} is not a readable release TRO: {str(exc).splitlines()[0]}")
        return report
    if (problem := _fingerprint_problem(release_tro.name, tro)) is not None:
        report.problems.append(problem)
    report.fingerprint_ok = problem is None
    report.revisions_checked = 1
    if not release_dir.is_dir():
        report.problems.append(f"no published copy at {release_dir}")
        return report
    if not published_tro.is_file() or published_tro.read_bytes() != release_tro.read_bytes():
        report.problems.append(f"{published_tro}: not the release TRO of the store ({release_tro})")
    files = located(tro, RELEASE_ARRANGEMENT_ID)
    if files.get(tro.run_tro or "") != run_tro_sha256:
        report.problems.append(f"the release TRO's run TRO {tro.run_tro} has sha256 {files.get(tro.run_tro or '')}, "
                               f"the registry names {run_tro_sha256}")
    rehash = _Rehasher(report)
    for path, expected in files.items():
        rehash.check(release_dir, path, expected)
    listed = files.keys() | {release_tro.name}
    report.problems += [f"{release_dir.name}/{rel}: a file the release TRO does not list (stray or temporary)"
                        for rel in sorted(str(p.relative_to(release_dir)) for p in release_dir.rglob("*") if not p.is_dir())
                        if rel not in listed]
    return report


def sealed_outputs(revisions: list[TransparentResearchObject]) -> dict[str, str]:
    """{path: sha256} of a run's files as its TRO revisions list them; a path two revisions list with
    different hashes (a file rewritten in an append-only run) is left out: no one vouches for it."""
    listed: dict[str, set[str]] = {}
    for tro in revisions:
        for path, digest in located(tro, OUTPUTS_ID).items():
            listed.setdefault(path, set()).add(digest)
    return {path: digest for path, (digest, *others) in listed.items() if not others}


class SealedRunLender:
    """The rule for reusing an earlier run's files: the run is sealed (completed or promoted), its
    whole TRO chain checks (check_chain, cached per run: one lender serves one step), its revisions
    list each file with the sha256 asked for, and those files (only those) re-hash to it."""

    def __init__(self, store: LocalRunStore, gnupg_home: str | None = None):
        self.store = store
        self.gnupg_home = gnupg_home
        self._sealed_files: dict[str, dict[str, str] | None] = {}

    def _files(self, run_id: str) -> dict[str, str] | None:
        """What the run's TRO chain vouches for (path -> sha256), or None when it vouches for nothing."""
        if run_id not in self._sealed_files:
            self._sealed_files[run_id] = None
            try:
                sealed = self.store.read_meta(run_id).status in SEALED
            except (RunStoreError, ValueError):
                sealed = False
            if sealed:
                chain = check_chain(self.store, run_id, self.gnupg_home)
                if not chain.problems and chain.readable:
                    self._sealed_files[run_id] = sealed_outputs(chain.readable)
        return self._sealed_files[run_id]

    def lends(self, run_id: str, files: dict[str, str]) -> bool:
        sealed = self._files(run_id)
        return (sealed is not None and all(sealed.get(rel) == digest for rel, digest in files.items())
                and files_verify(self.store, run_id, files))
