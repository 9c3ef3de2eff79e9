"""OpenLineage events for every step of a release: START before it, COMPLETE or FAIL after it.

Each event names the step's input files (the upstream steps' outputs) and, on COMPLETE, its output
files, both with their sha256 as the dataset version, and carries the runtime environment in a
custom run facet (`usdataRuntimeEnvironment`). Events go to files by default, one file per event
under `{store}/lineage/{run_id}/`, written atomically so nothing is ever appended to or rewritten;
or to an HTTP endpoint (Marquez or any OpenLineage backend). The API key is read from
OPENLINEAGE_API_KEY when a transport is built and is never part of the settings, an event or a log.
Emitting never fails a step: a transport error is logged as a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import RunFacet, dataset_version_dataset, error_message_run, parent_run, tags_run
from openlineage.client.serde import Serde
from openlineage.client.transport.http import ApiKeyTokenProvider, HttpConfig, HttpTransport, TokenProvider
from openlineage.client.transport.transport import Transport
from openlineage.client.uuid import generate_static_uuid
from pydantic import BaseModel

from resources.files import write_bytes_atomic
from resources.ledger import redact

TRANSPORT_VARIABLE = "PIPELINE_LINEAGE"  # file | http | off
URL_VARIABLE = "OPENLINEAGE_URL"
API_KEY_VARIABLE = "OPENLINEAGE_API_KEY"
LINEAGE_DIR = "lineage"  # under the run store
NAMESPACE = "usdata-pipeline"
RELEASE_JOB = "release"
DATASET_NAMESPACE = "file"  # OpenLineage's naming for local files: namespace "file", name the absolute path
PRODUCER = "https://policyengine.org/usdata-pipeline"
ENVIRONMENT_FACET = "usdataRuntimeEnvironment"
# Bounded: a step waits at most one timeout per event for an unreachable backend, never a retry series.
NO_RETRY = {"total": 0}

log = logging.getLogger(__name__)


@attr.define
class RuntimeEnvironmentRunFacet(RunFacet):
    """Where and on what a step ran (resources/runtime.py), and the env_id that identity derives from it."""

    environment: dict
    envId: str | None = attr.field(default=None)  # noqa: N815 (OpenLineage field names are camelCase)

    @staticmethod
    def _get_schema() -> str:
        return "https://policyengine.org/openlineage/0.1/RuntimeEnvironmentRunFacet.json#/$defs/RuntimeEnvironmentRunFacet"


class LineageSettings(BaseModel):
    """Where events go. Unset fields come from PIPELINE_LINEAGE and OPENLINEAGE_URL (http when a URL
    is set, else file); a step process gets them from its Dagster resource, not from os.environ."""

    transport: Literal["file", "http", "off"] = "file"
    url: str | None = None
    endpoint: str = "api/v1/lineage"
    directory: str | None = None  # file transport; default {store}/lineage
    timeout_s: float = 2.0

    @classmethod
    def resolve(cls, transport: str | None = None, url: str | None = None, directory: str | None = None) -> LineageSettings:
        url = url or os.environ.get(URL_VARIABLE)
        transport = transport or os.environ.get(TRANSPORT_VARIABLE) or ("http" if url else "file")
        if transport not in ("file", "http", "off"):
            raise ValueError(f"unknown lineage transport {transport!r}: expected file, http or off")
        if transport == "http" and not url:
            raise ValueError(f"lineage transport http needs a URL ({URL_VARIABLE})")
        if transport == "http" and not _is_http_url(url):
            raise ValueError(f"lineage URL {redact(url)!r} ({URL_VARIABLE}): expected http(s)://host[:port][/path]")
        return cls(transport=transport, url=url, directory=directory)


def _is_http_url(url: str) -> bool:
    try:
        parsed = urlsplit(url)
        return parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port or 1) > 0
    except ValueError:  # a bad port or bracketed host
        return False


class RunStoreFileTransport(Transport):
    """One file per event, {directory}/{step}.{OpenLineage run id}.{eventType}.json, written atomically.

    openlineage's own FileTransport writes in place or appends to one file; a run's records here are
    append-only and a reader must never see half an event.
    """

    kind = "usdata-file"

    def __init__(self, directory: Path):
        self.directory = directory

    def emit(self, event: RunEvent) -> None:
        step = event.job.name.removeprefix(f"{RELEASE_JOB}.")
        name = f"{step}.{event.run.runId}.{event.eventType.value}.json"
        write_bytes_atomic(self.directory / name, Serde.to_json(event).encode())


@dataclass(frozen=True)
class StepRun:
    """One attempt of one step of a release run, as OpenLineage sees it."""

    run_id: str
    release_started_at: datetime
    step: str
    started_at: datetime
    inputs: dict[str, str]  # absolute path -> sha256

    @property
    def lineage_run_id(self) -> str:
        """Deterministic and time-ordered (UUIDv7): the same attempt always has the same id."""
        return str(generate_static_uuid(self.started_at, f"{self.run_id}/{self.step}".encode()))

    @property
    def release_run_id(self) -> str:
        return str(generate_static_uuid(self.release_started_at, self.run_id.encode()))


def _datasets(kind, files: dict[str, str]) -> list:
    version = dataset_version_dataset.DatasetVersionDatasetFacet
    return [kind(namespace=DATASET_NAMESPACE, name=path, facets={"version": version(datasetVersion=sha256)})
            for path, sha256 in sorted(files.items())]


class Lineage:
    """Sends the events of a run's steps through an OpenLineage client with the configured transport."""

    def __init__(self, settings: LineageSettings, store_root: Path, api_key: str | None = None):
        self.settings = settings
        self.directory = Path(settings.directory) if settings.directory else Path(store_root) / LINEAGE_DIR
        self._api_key = api_key or os.environ.get(API_KEY_VARIABLE)

    @classmethod
    def configured(cls, store_root: Path) -> Lineage:
        return cls(LineageSettings.resolve(), store_root)

    def _transport(self, run_id: str) -> Transport:
        if self.settings.transport == "file":
            return RunStoreFileTransport(self.directory / run_id)
        auth = ApiKeyTokenProvider({"apiKey": self._api_key}) if self._api_key else TokenProvider({})
        config = HttpConfig(url=self.settings.url, endpoint=self.settings.endpoint, timeout=self.settings.timeout_s,
                            auth=auth, retry=dict(NO_RETRY))
        return HttpTransport(config)

    def event(self, step: StepRun, state: RunState, environment: dict, env_id: str | None = None,
              outputs: dict[str, str] | None = None, error: str | None = None) -> RunEvent:
        facets = {
            "parent": parent_run.ParentRunFacet(run=parent_run.Run(runId=step.release_run_id),
                                                job=parent_run.Job(namespace=NAMESPACE, name=RELEASE_JOB)),
            "tags": tags_run.TagsRunFacet(tags=[tags_run.TagsRunFacetFields(key="run_id", value=step.run_id, source=NAMESPACE)]),
            ENVIRONMENT_FACET: RuntimeEnvironmentRunFacet(environment=environment, envId=env_id, producer=PRODUCER),
        }
        if error is not None:
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(message=error, programmingLanguage="python")
        return RunEvent(
            eventType=state,
            eventTime=datetime.now(timezone.utc).isoformat(),
            producer=PRODUCER,
            run=Run(runId=step.lineage_run_id, facets=facets),
            job=Job(namespace=NAMESPACE, name=f"{RELEASE_JOB}.{step.step}"),
            inputs=_datasets(InputDataset, step.inputs),
            outputs=_datasets(OutputDataset, outputs or {}),
        )

    def emit(self, step: StepRun, state: RunState, environment: dict, env_id: str | None = None,
             outputs: dict[str, str] | None = None, error: str | None = None) -> None:
        """Send one event; a failure is a warning, never the step's failure."""
        if self.settings.transport == "off":
            return
        try:
            event = self.event(step, state, environment, env_id, outputs, error)
            OpenLineageClient(transport=self._transport(step.run_id)).emit(event)
        except Exception as exc:  # lineage is a report about the step, not part of it
            log.warning(redact(f"OpenLineage {state.value} event of {step.run_id} {step.step} not sent: {type(exc).__name__}: {exc}".splitlines()[0]))
