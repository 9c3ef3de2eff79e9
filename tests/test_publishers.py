"""Publishers: each places a release under its version, idempotently, and never overwrites."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from dagster_gcp import GCSResource
from huggingface_hub import CommitOperationAdd

from resources.publishers import (
    GcsPublisher,
    HfPublisher,
    LocalPublisher,
    PublishError,
    PublishResult,
)
from resources.registry import HfInfo, InvalidVersion

RELEASE = {
    "states/AL.h5": b"alabama",
    "national/US.h5": b"united states",
    "artifacts/policy_data.db": b"policy",
    "diagnostics/validation.csv": b"target,error\nA,0.1\n",
    "trace.tro.jsonld": b'{"@context": {}}',
}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The release's local files, keyed by their path inside the release."""
    paths = {}
    for rel, data in RELEASE.items():
        path = tmp_path / "staging" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[rel] = path
    return paths


def test_local_publisher_copies_into_production(tmp_path, files):
    root = tmp_path / "store"
    result = LocalPublisher(root).publish("1.0.0", files)
    release = root / "production" / "1.0.0"
    assert result == PublishResult(backend="local", location=str(release))
    for rel, data in RELEASE.items():
        assert (release / rel).read_bytes() == data
        assert (release / rel).stat().st_mode & 0o777 == 0o644
    assert not [p for p in release.rglob("*") if p.name.endswith(".tmp")]


def test_local_publisher_is_idempotent_and_never_overwrites(tmp_path, files):
    publisher = LocalPublisher(tmp_path / "store")
    first = publisher.publish("1.0.0", files)
    assert publisher.publish("1.0.0", files) == first
    files["states/AL.h5"].write_bytes(b"changed")
    with pytest.raises(PublishError, match="production/1.0.0/states/AL.h5"):
        publisher.publish("1.0.0", files)
    assert (tmp_path / "store/production/1.0.0/states/AL.h5").read_bytes() == b"alabama"


@pytest.mark.parametrize("rel", ["../escape.h5", "/abs.h5", "states/../../x.h5", ""])
def test_paths_outside_the_release_are_refused(tmp_path, files, rel):
    with pytest.raises(PublishError, match="inside the release"):
        LocalPublisher(tmp_path / "store").publish("1.0.0", {rel: files["states/AL.h5"]})


def test_malformed_version_is_refused_before_publishing(tmp_path, files):
    with pytest.raises(InvalidVersion, match="'1.0'"):
        LocalPublisher(tmp_path / "store").publish("1.0", files)
    assert not (tmp_path / "store").exists()


def test_gcs_publisher_records_downloadable_generations(gcs_client, gcs_bucket, files):
    result = GcsPublisher(gcs_client, gcs_bucket.name).publish("1.0.0", files)
    assert result.backend == "gcs"
    assert result.location == f"gs://{gcs_bucket.name}/production/1.0.0"
    generations = result.gcs.generations
    assert result.gcs.bucket == gcs_bucket.name
    assert set(generations) == {f"production/1.0.0/{rel}" for rel in RELEASE}
    for rel, data in RELEASE.items():
        name = f"production/1.0.0/{rel}"
        assert gcs_bucket.blob(name, generation=generations[name]).download_as_bytes() == data


def test_gcs_publisher_is_idempotent_and_never_overwrites(gcs_client, gcs_bucket, files):
    publisher = GcsPublisher(gcs_client, gcs_bucket.name)
    first = publisher.publish("1.0.0", files)
    assert publisher.publish("1.0.0", files) == first
    files["national/US.h5"].write_bytes(b"changed")
    name = "production/1.0.0/national/US.h5"
    with pytest.raises(PublishError, match=f"gs://{gcs_bucket.name}/{name}"):
        publisher.publish("1.0.0", files)
    blob = gcs_bucket.get_blob(name)
    assert blob.generation == first.gcs.generations[name]
    assert blob.download_as_bytes() == b"united states"


def test_gcs_client_from_dagster_resource(gcs_endpoint, gcs_bucket, files, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    client = GCSResource(project="test").get_client()
    result = GcsPublisher(client, gcs_bucket.name, prefix="releases").publish("2.0.0", files)
    assert gcs_bucket.get_blob("releases/2.0.0/trace.tro.jsonld").download_as_bytes() == (
        RELEASE["trace.tro.jsonld"]
    )
    assert len(result.gcs.generations) == len(RELEASE)


SECRET = "hf_not_a_real_token_0123456789"


class HubDouble:
    """Records every call; keeps commits and per-commit trees like the hub, including the
    parent_commit check. .h5 and .db files are LFS (known by SHA-256), the rest by git blob id."""

    def __init__(self, raises: Exception | None = None):
        self.token = SECRET
        self.raises = raises
        self.calls: list[tuple[str, dict]] = []
        self.head = "0" * 40
        self.commits = [SimpleNamespace(commit_id=self.head, title="initial commit")]
        self.trees: dict[str, dict[str, SimpleNamespace]] = {self.head: {}}

    def repo_info(self, repo_id, *, repo_type=None):
        self.calls.append(("repo_info", dict(repo_id=repo_id, repo_type=repo_type)))
        return SimpleNamespace(sha=self.head)

    def list_repo_commits(self, repo_id, *, repo_type=None, revision=None):
        self.calls.append(("list_repo_commits", dict(repo_id=repo_id, revision=revision)))
        index = [c.commit_id for c in self.commits].index(revision or self.head)
        return self.commits[index:]

    def get_paths_info(self, repo_id, paths, *, revision=None, repo_type=None):
        self.calls.append(("get_paths_info", dict(paths=paths, revision=revision)))
        tree = self.trees[revision or self.head]
        return [tree[path] for path in paths if path in tree]

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        if self.raises:
            raise self.raises
        if kwargs["parent_commit"] != self.head:
            raise RuntimeError("412 Precondition Failed: a commit has happened since parent")
        oid = hashlib.sha1(f"{self.head}{kwargs['commit_message']}".encode()).hexdigest()
        tree = dict(self.trees[self.head])
        for op in kwargs["operations"]:
            tree[op.path_in_repo] = _hub_file(op.path_in_repo, Path(op.path_or_fileobj))
        self.trees[oid] = tree
        self.commits.insert(0, SimpleNamespace(commit_id=oid, title=kwargs["commit_message"]))
        self.head = oid
        return SimpleNamespace(oid=oid, commit_message=kwargs["commit_message"])

    def calls_to(self, name: str) -> list[dict]:
        return [kwargs for called, kwargs in self.calls if called == name]


def _hub_file(path: str, local: Path) -> SimpleNamespace:
    if path.endswith((".h5", ".db")):
        lfs = SimpleNamespace(sha256=hashlib.sha256(local.read_bytes()).hexdigest())
        return SimpleNamespace(path=path, blob_id="pointer", lfs=lfs)
    blob_id = subprocess.run(["git", "hash-object", str(local)], capture_output=True, text=True,
                             check=True).stdout.strip()
    return SimpleNamespace(path=path, blob_id=blob_id, lfs=None)


def test_hf_publisher_makes_one_commit_on_the_head_it_read(files):
    hub = HubDouble()
    result = HfPublisher(hub, "org/us-data").publish("1.0.0", files)
    (commit,) = hub.calls_to("create_commit")
    assert commit["repo_id"] == "org/us-data" and commit["repo_type"] == "dataset"
    assert commit["commit_message"] == "Release 1.0.0"
    assert commit["parent_commit"] == "0" * 40
    assert all(isinstance(op, CommitOperationAdd) for op in commit["operations"])
    assert [(op.path_in_repo, op.path_or_fileobj) for op in commit["operations"]] == [
        (f"1.0.0/{rel}", str(path)) for rel, path in files.items()
    ]
    assert result.hf == HfInfo(repo="org/us-data", commit=hub.head)
    assert result.location == f"hf://datasets/org/us-data@{hub.head}/1.0.0"
    assert SECRET not in result.model_dump_json()


def test_hf_publisher_is_idempotent_and_never_overwrites(files):
    hub = HubDouble()
    publisher = HfPublisher(hub, "org/us-data")
    first = publisher.publish("1.0.0", files)
    publisher.publish("1.1.0", {"trace.tro.jsonld": files["trace.tro.jsonld"]})
    assert publisher.publish("1.0.0", files) == first  # found in history under the newer release
    assert len(hub.calls_to("create_commit")) == 2
    for rel in ("diagnostics/validation.csv", "states/AL.h5"):  # git blob and LFS files
        changed = {**files, rel: files[rel].with_suffix(".changed")}
        changed[rel].write_bytes(b"changed")
        with pytest.raises(PublishError, match=f"has different bytes for 1.0.0/{rel}"):
            publisher.publish("1.0.0", changed)
    assert len(hub.calls_to("create_commit")) == 2


def test_hf_publisher_reports_a_moved_head(files):
    hub = HubDouble()
    publisher = HfPublisher(hub, "org/us-data")
    real_create = hub.create_commit

    def someone_else_commits_first(**kwargs):
        hub.head = "f" * 40  # another writer's commit lands between repo_info and ours
        return real_create(**kwargs)

    hub.create_commit = someone_else_commits_first
    with pytest.raises(PublishError) as refused:
        publisher.publish("1.0.0", files)
    message = str(refused.value)
    assert "org/us-data" in message and "Release 1.0.0" in message and "0" * 40 in message
    assert "412 Precondition Failed" in message and SECRET not in message


def test_hf_publisher_propagates_a_failing_commit(files):
    cause = ConnectionError("hub unreachable")
    with pytest.raises(PublishError, match="hub unreachable") as refused:
        HfPublisher(HubDouble(raises=cause), "org/us-data").publish("1.0.0", files)
    assert refused.value.__cause__ is cause
    assert SECRET not in str(refused.value)
