"""Step records and step reuse.

Each step of a run leaves runs/{run_id}/steps/{step}.json: its reuse key (step code version, env_id,
step config, input hashes, the hashes of the raw inputs it read), the sha256 of every file it wrote,
its figures and its environment. A later step whose key matches an earlier run's record takes that
run's files (hard links: a run's files are never rewritten, so sharing an inode is safe) instead of
recomputing, but only where a `Lender` vouches for them: the step record and the files are what the
source run's own TRO sealed, and the bytes still hash to it.
A step made of independent parts (the area files: the local areas read the state weights, the
national file the national weights) also records a key per part, and reuses part by part.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Iterator, Protocol

from pydantic import BaseModel, Field

from resources.files import link_or_copy, sha256_file
from resources.run_store import LocalRunStore, RunStoreError, UnreadableRecord, parse_model, utcnow


class StepRecord(BaseModel):
    step: str
    reuse_key: str
    code_version: str
    env_id: str
    config_hash: str
    inputs: dict[str, str]  # upstream step -> digest of its outputs
    raw_inputs: dict[str, str] = Field(default_factory=dict)  # "raw_inputs/NAME" -> sha256 of the bytes read
    outputs: dict[str, str]  # path relative to the run directory -> sha256
    figures: dict[str, float | int] = Field(default_factory=dict)
    reuse: str = "computed"  # computed | reused | rebuilt (a verified backfill of a completed run)
    reused_from: str | None = None
    part_keys: dict[str, str] = Field(default_factory=dict)  # part -> its reuse key
    reused_parts: dict[str, str] = Field(default_factory=dict)  # part -> the run it was taken from
    output_figures: dict[str, dict[str, float | int]] = Field(default_factory=dict)  # output path -> its own figures
    environment: dict = Field(default_factory=dict)
    started_at: datetime | None = None
    ended_at: datetime = Field(default_factory=utcnow)

    def outputs_digest(self) -> str:
        return hashlib.sha256("\n".join(f"{p} {h}" for p, h in sorted(self.outputs.items())).encode()).hexdigest()


def record_key(step: str) -> str:
    return f"steps/{step}.json"


REBUILD_MARK = ".rebuild-"


def next_rebuild_name(store: LocalRunStore, run_id: str, step: str) -> str:
    """steps/{step}.rebuild-N.json with the next free N: rebuild records sit beside the original."""
    n = 1
    while store.exists(store.run_key(run_id, f"steps/{step}{REBUILD_MARK}{n}.json")):
        n += 1
    return f"steps/{step}{REBUILD_MARK}{n}.json"


def rebuild_records(store: LocalRunStore, run_id: str) -> list[StepRecord]:
    prefix = store.run_key(run_id, "steps/")
    keys = [k for k in store.list(prefix) if REBUILD_MARK in k]
    records = [parse_model(store.read_bytes(k), store.path(k), StepRecord) for k in keys]
    return sorted(records, key=lambda r: r.ended_at)


def reuse_key(
    step: str, code_version: str, env_id: str, config_hash: str, inputs: dict[str, str], raw_inputs: dict[str, str]
) -> str:
    payload = {"step": step, "code": code_version, "env": env_id, "config": config_hash, "inputs": inputs,
               "raw_inputs": raw_inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_record(store: LocalRunStore, run_id: str, step: str) -> StepRecord | None:
    found = _read_record_bytes(store, run_id, step)
    return _parse_record(store, run_id, step, found) if found is not None else None


def _parse_record(store: LocalRunStore, run_id: str, step: str, data: bytes) -> StepRecord:
    return parse_model(data, store.path(store.run_key(run_id, record_key(step))), StepRecord)


def _read_record_bytes(store: LocalRunStore, run_id: str, step: str) -> bytes | None:
    key = store.run_key(run_id, record_key(step))
    return store.read_bytes(key) if store.exists(key) else None


def write_record(store: LocalRunStore, run_id: str, record: StepRecord, name: str | None = None) -> None:
    store.write_run_file(run_id, name or record_key(record.step), record.model_dump_json(indent=2).encode())


def hash_outputs(store: LocalRunStore, run_id: str, relpaths: list[str]) -> dict[str, str]:
    return {rel: sha256_file(store.path(store.run_key(run_id, rel))) for rel in sorted(relpaths)}


def files_verify(store: LocalRunStore, run_id: str, outputs: dict[str, str]) -> bool:
    for rel, expected in outputs.items():
        path = store.path(store.run_key(run_id, rel))
        if not path.is_file() or sha256_file(path) != expected:
            return False
    return True


def verifies(store: LocalRunStore, run_id: str, record: StepRecord) -> bool:
    return files_verify(store, run_id, record.outputs)


class Lender(Protocol):
    """Vouches for an earlier run's files before they are reused (tro.SealedRunLender)."""

    def lends(self, run_id: str, files: dict[str, str]) -> bool:
        """Whether `files` (path in the run -> sha256) of `run_id` may be reused."""


def _earlier_records(store: LocalRunStore, run_id: str, step: str) -> Iterator[tuple[str, StepRecord, dict[str, str]]]:
    """(run_id, record of `step`, {the record's path: the sha256 of its bytes}) of every other run, newest first."""
    for meta in reversed(store.list_runs()):
        if meta.run_id == run_id or (data := _read_record_bytes(store, meta.run_id, step)) is None:
            continue
        try:
            record = _parse_record(store, meta.run_id, step, data)
        except UnreadableRecord:  # another run's broken record is not reusable; it affects only that run
            continue
        yield meta.run_id, record, {record_key(step): hashlib.sha256(data).hexdigest()}


def find_reusable(store: LocalRunStore, run_id: str, step: str, key: str, lender: Lender) -> tuple[str, StepRecord] | None:
    """The newest other run whose record of `step` has this key and for whose record and files
    `lender` vouches."""
    for source, record, record_file in _earlier_records(store, run_id, step):
        if record.reuse_key == key and lender.lends(source, record_file | record.outputs):
            return source, record
    return None


def find_reusable_part(
    store: LocalRunStore, run_id: str, step: str, part: str, key: str, paths: list[str], lender: Lender
) -> tuple[str, StepRecord, dict[str, str]] | None:
    """The newest other run whose record of `step` made `part` with this key and holds every one of
    the part's `paths` (a partial rebuild may not), with their sha256s; `lender` vouches for the
    record and those files (only those are re-hashed)."""
    for source, record, record_file in _earlier_records(store, run_id, step):
        if record.part_keys.get(part) != key or not all(rel in record.outputs and rel in record.output_figures for rel in paths):
            continue
        files = {rel: record.outputs[rel] for rel in paths}
        if lender.lends(source, record_file | files):
            return source, record, files
    return None


def link_outputs(store: LocalRunStore, source_run: str, run_id: str, outputs: dict[str, str]) -> None:
    """Link the files `outputs` (path -> sha256) of `source_run` into `run_id`. A file the run already
    has with the same bytes (a resumed run's area file) is kept; one with other bytes is refused."""
    for rel, digest in outputs.items():
        source = store.path(store.run_key(source_run, rel))
        target = store.output_path(run_id, rel)
        if target.exists():
            if sha256_file(target) == digest:
                continue
            raise RunStoreError(f"cannot reuse {rel} from {source_run}: run {run_id} already has other bytes there")
        link_or_copy(source, target)
