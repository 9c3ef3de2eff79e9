"""Run identity: run_id = {version}_{sha8}_{YYYYMMDD_HHMMSS} (UTC), the pinned SHA and the skew guard."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

from resources.git import FULL_SHA, running_code_sha

DISTRIBUTION = "usdata-pipeline"
RUN_ID_FORM = "{version}_{sha8}_{YYYYMMDD_HHMMSS}, e.g. 1.57.0_a1b2c3d4_20260318_143022"
_RUN_ID = re.compile(
    r"^(?P<version>\d+\.\d+\.\d+[0-9A-Za-z.+-]*)_(?P<sha8>[0-9a-f]{8})_(?P<stamp>\d{8}_\d{6})$"
)


class InvalidRunId(ValueError):
    """A string that is not a run_id."""


class VersionSkewError(RuntimeError):
    """A step was asked to run code other than its run's pinned SHA."""


@dataclass(frozen=True, order=True)
class RunId:
    started_at: datetime
    version: str
    sha8: str

    def __str__(self) -> str:
        return f"{self.version}_{self.sha8}_{self.started_at:%Y%m%d_%H%M%S}"


def make_run_id(version: str, sha: str, started_at: datetime | None = None) -> str:
    """Build a run_id from the package version, the pinned SHA and the (UTC) start time."""
    if not FULL_SHA.match(sha):
        raise InvalidRunId(f"pinned SHA {sha!r} is not a full 40-hex git SHA")
    when = (started_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    text = f"{version}_{sha[:8]}_{when:%Y%m%d_%H%M%S}"
    parse_run_id(text)
    return text


def parse_run_id(text: str) -> RunId:
    match = _RUN_ID.match(text or "")
    if match is None:
        raise InvalidRunId(f"malformed run_id {text!r}: expected {RUN_ID_FORM}")
    try:
        started = datetime.strptime(match["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        raise InvalidRunId(
            f"malformed run_id {text!r}: {match['stamp']} is not a valid time; expected {RUN_ID_FORM}"
        ) from None
    return RunId(started_at=started, version=match["version"], sha8=match["sha8"])


def package_version() -> str:
    return metadata.version(DISTRIBUTION)


def ensure_no_skew(run_id: str, pinned_sha: str, step: str, running_sha: str | None = None) -> None:
    """Refuse to run `step` of `run_id` unless this process runs the run's pinned code."""
    running = running_sha or running_code_sha()
    if running != pinned_sha:
        raise VersionSkewError(
            f"version skew: step {step} of run {run_id} is pinned to {pinned_sha} "
            f"but the running code is at {running}; check out {pinned_sha[:8]} or start a new run"
        )
