"""The run's Transparent Research Object (TROV 0.1): what went in, what came out, and how it was made.

The TRO is built from what the run already recorded (meta.json, steps/*.json) and from the packaged
raw inputs' SHA256SUMS, so writing it re-hashes nothing large; `verify_run` is where every file is
hashed again. The layout is the one tro-utils 0.5.2 reads and writes (one node in `@graph`, the
fingerprint's hash under `trov:hash`, performances bound to arrangements through
`trov:ArrangementBinding`), so that an independent tool agrees with us on what a run contains.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Annotated, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, computed_field

from pipeline_assets.identity import package_version
from pipeline_assets.reuse import StepRecord, read_record, rebuild_records
from pipeline_assets.stages import STEP_INPUTS, STEP_ORDER
from pipeline_assets.steps.geography import raw_inputs_dir
from resources.files import sha256_file
from resources.run_store import LocalRunStore, StepTiming, utcnow

CONTEXT = {
    "trov": "https://w3id.org/trace/trov/0.1#",
    "schema": "https://schema.org/",
    "pe": "https://policyengine.org/trace/0.1#",
    "rdfs": "http://www.w3.org/2000/01/rdf-schema#",
}
TRS_ID = "pe:usdata-pipeline"  # tro-utils requires a TRS @id that is an IRI outside the trov: prefix
COMPOSITION_ID = "composition/1"
INPUTS_ID = "arrangement/0"
OUTPUTS_ID = "arrangement/1"
RAW_INPUTS_PREFIX = raw_inputs_dir().name  # input paths are relative to the raw inputs' parent folder
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

Timestamp = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str)]


# --- the records written: JSON-LD nodes, their compact IRIs as aliases ---------------------------
class Node(BaseModel):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class Ref(Node):
    id: str = Field(alias="@id")


class Hash(Node):
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


class TrustedResearchPerformance(Node):
    """One step of the run, with the runtime environment it ran in as pe: properties."""

    id: str = Field(alias="@id")
    type: Literal["trov:TrustedResearchPerformance"] = Field("trov:TrustedResearchPerformance", alias="@type")
    comment: str = Field(alias="rdfs:comment")
    conducted_by: Ref = Field(Ref(id=TRS_ID), alias="trov:wasConductedBy")
    started_at: Timestamp | None = Field(None, alias="trov:startedAtTime")
    ended_at: Timestamp | None = Field(None, alias="trov:endedAtTime")
    accessed: ArrangementBinding = Field(alias="trov:accessedArrangement")
    contributed: ArrangementBinding = Field(alias="trov:contributedToArrangement")
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
    performances: list[TrustedResearchPerformance] = Field(alias="trov:hasPerformance")
    run_id: str = Field(alias="pe:runId")
    git_sha: str = Field(alias="pe:gitSha")
    branch: str | None = Field(None, alias="pe:branch")
    dirty: bool = Field(alias="pe:dirty")
    diff_sha256: str | None = Field(None, alias="pe:diffSha256")
    env_id: str | None = Field(None, alias="pe:envId")
    config_hash: str | None = Field(None, alias="pe:configHash")
    version: str | None = Field(None, alias="pe:version")  # release TROs only
    run_tro: str | None = Field(None, alias="pe:runTro")  # release TROs: the run's TRO they publish


class TroDocument(Node):
    context: dict[str, str] = Field(default_factory=lambda: dict(CONTEXT), alias="@context")
    graph: list[TransparentResearchObject] = Field(alias="@graph", min_length=1, max_length=1)


# --- building ------------------------------------------------------------------------------------
def composition_fingerprint(hash_values: Iterable[str]) -> str:
    """sha256 of the sorted artifact hashes concatenated: tro-utils' CompositionFingerprint.compute."""
    return hashlib.sha256("".join(sorted(hash_values)).encode()).hexdigest()


def mime_type(path: str) -> str:
    return MIME_TYPES.get(Path(path).suffix, "application/octet-stream")


def packaged_raw_inputs() -> dict[str, str]:
    """{"raw_inputs/<name>": sha256} as the package's SHA256SUMS declares them."""
    entries = (line.split() for line in (raw_inputs_dir() / "SHA256SUMS").read_text().splitlines() if line)
    return dict(sorted((f"{RAW_INPUTS_PREFIX}/{name}", digest) for digest, name in entries))


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
                artifacts[digest] = ResearchArtifact(
                    id=f"{COMPOSITION_ID}/artifact/{len(artifacts)}", hash=Hash(value=digest), mime_type=mime_type(path)
                )
            locations.append(
                ArtifactLocation(id=f"{arrangement_id}/location/{index}", artifact=Ref(id=artifacts[digest].id), path=path)
            )
        built.append(ArtifactArrangement(id=arrangement_id, comment=comment, locations=locations))
    fingerprint = CompositionFingerprint(hash=Hash(value=composition_fingerprint(artifacts.keys())))
    return ArtifactComposition(artifacts=list(artifacts.values()), fingerprint=fingerprint), built


def _binding(performance_id: str, index: int, arrangement_id: str) -> ArrangementBinding:
    return ArrangementBinding(id=f"{performance_id}/binding/{index}", arrangement=Ref(id=arrangement_id))


def _performance(index: int, record: StepRecord, timing: StepTiming | None) -> TrustedResearchPerformance:
    """A step's performance. Steps with no upstream step read the raw inputs; the others read
    upstream files of the run. Times are the step record's (meta.json keeps only a step's latest
    timing, which a backfill replaces)."""
    env = record.environment
    performance_id = f"trp/{index}"
    versions = env.get("library_versions")
    return TrustedResearchPerformance(
        id=performance_id,
        comment=f"step {record.step} ({record.reuse}{f' from {record.reused_from}' if record.reused_from else ''}"
                + "".join(f", {part} part reused from {run}" for part, run in sorted(record.reused_parts.items())) + ")",
        started_at=record.started_at or (timing.started_at if timing else None),
        ended_at=record.ended_at,
        accessed=_binding(performance_id, 0, OUTPUTS_ID if STEP_INPUTS[record.step] else INPUTS_ID),
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
    )


def build_tro(store: LocalRunStore, run_id: str, public_key: str | None = None) -> dict:
    """The run's TRO as a JSON-LD document; `public_key` (armored) is the signer's, when signing."""
    meta = store.read_meta(run_id)
    records = [record for step in STEP_ORDER if (record := read_record(store, run_id, step)) is not None]
    records += rebuild_records(store, run_id)  # backfills of a completed run, after its own steps
    composition, arrangements = _compose({
        INPUTS_ID: ("packaged raw inputs (paths relative to pipeline_assets/data/)", packaged_raw_inputs()),
        OUTPUTS_ID: (f"files of run {run_id} (paths relative to runs/{run_id}/)", run_files(store, run_id, records)),
    })
    tro = TransparentResearchObject(
        name=f"usdata-pipeline run {run_id}",
        description=f"US microdata release run {run_id} of {meta.sha}",
        date_created=utcnow(),
        assembled_by=TrustedResearchSystem(name=f"usdata-pipeline {package_version()}", public_key=public_key),
        composition=composition,
        arrangements=arrangements,
        performances=[_performance(i, r, meta.step_timings.get(r.step)) for i, r in enumerate(records)],
        run_id=run_id,
        git_sha=meta.sha,
        branch=meta.branch,
        dirty=meta.dirty,
        diff_sha256=meta.diff_sha256,
        env_id=meta.env_id,
        config_hash=meta.config_hash,
    )
    return TroDocument(graph=[tro]).model_dump(mode="json", exclude_none=True)


def build_release_tro(store: LocalRunStore, run_id: str, version: str, files: dict[str, str], run_tro: str) -> dict:
    """The TRO of a release: the published files (path in the release -> sha256), pointing at the
    TRO of the run they come from (which is itself one of the files)."""
    meta = store.read_meta(run_id)
    composition, arrangements = _compose({"arrangement/release": (f"release {version} (paths relative to production/{version}/)", files)})
    tro = TransparentResearchObject(
        id="release",
        name=f"usdata-pipeline release {version}",
        description=f"release {version}: the files of run {run_id} promoted",
        date_created=utcnow(),
        assembled_by=TrustedResearchSystem(name=f"usdata-pipeline {package_version()}"),
        composition=composition,
        arrangements=arrangements,
        performances=[],
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
    return TroDocument(graph=[tro]).model_dump(mode="json", exclude_none=True)


def canonical_bytes(doc: dict) -> bytes:
    """The bytes that are written and signed (tro-utils signs the same serialisation)."""
    return json.dumps(doc, indent=2, sort_keys=True).encode()


# --- signing -------------------------------------------------------------------------------------
class SigningError(RuntimeError):
    """gpg could not sign or export the configured key."""


class GpgSigner:
    """Detached ASCII-armored signatures by the local gpg binary, offline; the secret key never
    leaves the keyring, and only the public key goes into the TRO (as trov:publicKey)."""

    def __init__(self, key_id: str, gnupg_home: str | None = None):
        self.key_id = key_id
        self.gnupg_home = gnupg_home

    def _gpg(self, action: str, *args: str, data: bytes | None = None) -> bytes:
        result = subprocess.run(_gpg_command(self.gnupg_home, *args), input=data, capture_output=True)
        output = result.stdout if result.returncode == 0 else b""
        if not output:
            detail = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise SigningError(f"gpg could not {action} with key {self.key_id}: {detail}")
        return output

    def sign(self, data: bytes) -> bytes:
        return self._gpg(
            "sign", "--yes", "--pinentry-mode", "loopback", "--local-user", self.key_id, "--detach-sign", "--armor",
            data=data,
        )

    def public_key(self) -> str:
        return self._gpg("export the public key", "--armor", "--export", self.key_id).decode()


def _gpg_command(gnupg_home: str | None, *args: str) -> list[str]:
    return ["gpg", "--batch", *(["--homedir", gnupg_home] if gnupg_home else []), *args]


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
    the next revision beside it. Signing happens first, so a signer that fails writes nothing."""
    data = canonical_bytes(build_tro(store, run_id, signer.public_key() if signer else None))
    signature = signer.sign(data) if signer else None
    rel = tro_name(len(tro_revisions(store, run_id)) + 1)
    path = store.write_run_file(run_id, rel, data)
    if signature is not None:
        store.write_run_file(run_id, rel + SIGNATURE_SUFFIX, signature)
    return path


# --- verifying -----------------------------------------------------------------------------------
class Mismatch(BaseModel):
    path: str
    expected: str
    found: str  # the file's sha256, or "missing"


class VerifyReport(BaseModel):
    run_id: str
    tro: str | None = None  # the TRO revision checked, relative to the run directory
    artifacts_checked: int = 0  # artifact locations (files) re-hashed
    mismatches: list[Mismatch] = Field(default_factory=list)
    fingerprint_ok: bool = False
    signature: Literal["ok", "bad", "unverifiable"] | None = None  # None: the TRO is not signed
    problems: list[str] = Field(default_factory=list)  # what is wrong with the TRO itself

    @computed_field
    @property
    def ok(self) -> bool:
        return self.tro is not None and self.fingerprint_ok and not self.mismatches and not self.problems

    def lines(self) -> list[str]:
        """One line per thing wrong."""
        return self.problems + [f"{m.path}: expected sha256 {m.expected}, found {m.found}" for m in self.mismatches]


def check_signature(data: Path, signature: Path, gnupg_home: str | None = None) -> Literal["ok", "bad", "unverifiable"]:
    """gpg's verdict on a detached signature: bad when the bytes changed, unverifiable without the key."""
    if shutil.which("gpg") is None:
        return "unverifiable"
    result = subprocess.run(
        _gpg_command(gnupg_home, "--status-fd", "1", "--verify", str(signature), str(data)), capture_output=True
    )
    status = result.stdout.decode(errors="replace")
    if result.returncode == 0 and "[GNUPG:] GOODSIG" in status:
        return "ok"
    return "bad" if "[GNUPG:] BADSIG" in status else "unverifiable"


def verify_run(store: LocalRunStore, run_id: str, gnupg_home: str | None = None) -> VerifyReport:
    """Re-hash every file the run's latest TRO lists, and check its fingerprint and signature."""
    store.read_meta(run_id)  # an unknown run is an error, not a failed verification
    revisions = tro_revisions(store, run_id)
    if not revisions:
        return VerifyReport(run_id=run_id, problems=[f"no TRO: runs/{run_id}/{TRO_NAME} does not exist"])
    path = revisions[-1]
    report = VerifyReport(run_id=run_id, tro=path.name)
    signature = path.with_name(path.name + SIGNATURE_SUFFIX)
    if signature.is_file():
        report.signature = check_signature(path, signature, gnupg_home)
        if report.signature != "ok":
            report.problems.append(f"{path.name}: signature {report.signature} ({signature.name})")
    try:
        tro = TroDocument.model_validate_json(path.read_bytes()).graph[0]
    except ValidationError as exc:
        report.problems.append(f"{path.name} is not a readable TRO: {str(exc).splitlines()[0]}")
        return report
    hashes = {artifact.id: artifact.hash.value for artifact in tro.composition.artifacts}
    recomputed = composition_fingerprint(hashes.values())
    report.fingerprint_ok = recomputed == tro.composition.fingerprint.hash.value
    if not report.fingerprint_ok:
        report.problems.append(
            f"{path.name}: fingerprint {tro.composition.fingerprint.hash.value} does not match its artifacts "
            f"({recomputed}): the TRO was edited"
        )
    roots = {INPUTS_ID: raw_inputs_dir().parent, OUTPUTS_ID: store.path(store.run_key(run_id))}
    for arrangement in tro.arrangements:
        root = roots.get(arrangement.id)
        if root is None:
            report.problems.append(f"{path.name}: unknown arrangement {arrangement.id}")
            continue
        for location in arrangement.locations:
            file = (root / location.path).resolve()
            expected = hashes.get(location.artifact.id)
            if expected is None or not file.is_relative_to(root):
                report.problems.append(
                    f"{path.name}: location {location.id} ({location.path}) is no listed artifact under {root.name}/"
                )
                continue
            found = sha256_file(file) if file.is_file() else "missing"
            report.artifacts_checked += 1
            if found != expected:
                report.mismatches.append(Mismatch(path=location.path, expected=expected, found=found))
    return report
