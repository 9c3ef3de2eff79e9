"""The production Dagster instance: PostgreSQL storage (dagster-postgres) and the queued run coordinator,
so runs from the git sensor, the UI and the command line wait in one queue that `dagster-daemon`
starts within a limit on release runs. `make ui` and a new $DAGSTER_HOME keep Dagster's embedded
SQLite; this is written only when asked:

    python -m pipeline_assets.production_instance --home DIR --hostname HOST --db-name DB --username USER

(or `make production-instance`). The password is never written: Dagster reads it from
$DAGSTER_PG_PASSWORD in each process that opens the instance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline_assets.jobs import JOB_TAG, RELEASE_JOB
from resources.files import write_bytes_atomic

PASSWORD_VARIABLE = "DAGSTER_PG_PASSWORD"


class ProductionInstance(BaseModel):
    """Where the PostgreSQL database is and how many runs may run at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hostname: str = Field(min_length=1, description="server host, or a Unix socket's directory (an absolute path)")
    port: int = Field(default=5432, ge=1, le=65535)
    db_name: str = Field(min_length=1)
    username: str = Field(min_length=1)
    max_concurrent_runs: int = Field(default=4, ge=1, description="runs of any job started at once")
    release_runs: int = Field(default=1, ge=1, description="release runs started at once")

    @model_validator(mode="after")
    def release_limit_within_the_run_limit(self) -> ProductionInstance:
        if self.release_runs > self.max_concurrent_runs:
            raise ValueError(f"release_runs={self.release_runs} is above max_concurrent_runs={self.max_concurrent_runs}: "
                             "expected at most as many release runs as runs")
        return self

    def postgres_db(self) -> dict:
        """dagster-postgres's `postgres_db`. A socket directory goes to libpq as the `host` parameter
        (a URL's host cannot hold a path); the port still names the socket's file. The driver is named:
        SQLAlchemy's default for `postgresql` is psycopg 3, while dagster-postgres brings psycopg2."""
        db = {"username": self.username, "password": {"env": PASSWORD_VARIABLE}, "db_name": self.db_name, "port": self.port,
              "scheme": "postgresql+psycopg2"}
        if self.hostname.startswith("/"):
            return {**db, "hostname": "localhost", "params": {"host": self.hostname}}
        return {**db, "hostname": self.hostname}

    def settings(self) -> bytes:
        """The dagster.yaml. The run launcher is Dagster's default (a process per run beside the daemon)."""
        document = {
            "telemetry": {"enabled": False},
            "python_logs": {"python_log_level": "WARNING"},
            "storage": {"postgres": {"postgres_db": self.postgres_db()}},
            "run_coordinator": {
                "module": "dagster",
                "class": "QueuedRunCoordinator",
                "config": {
                    "max_concurrent_runs": self.max_concurrent_runs,
                    "tag_concurrency_limits": [{"key": JOB_TAG, "value": RELEASE_JOB, "limit": self.release_runs}],
                },
            },
        }
        header = f"# The production instance, written by pipeline_assets.production_instance; password from ${PASSWORD_VARIABLE}.\n"
        return header.encode() + yaml.safe_dump(document, sort_keys=False).encode()


def first_error(exc: ValidationError) -> str:
    """One line for the first bad value: the field, what it was, what was expected."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}={error['input']!r}: {message}" if field else message


def write_settings(home: Path, instance: ProductionInstance) -> Path:
    """Write home/dagster.yaml, refusing to replace one (an instance's settings are its operator's)."""
    settings = home / "dagster.yaml"
    if settings.exists():
        raise FileExistsError(f"{settings} exists: expected a new instance's directory (remove it to rewrite)")
    home.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(settings, instance.settings())
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_assets.production_instance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="the instance's directory ($DAGSTER_HOME of the daemon and webserver)")
    for name, field in ProductionInstance.model_fields.items():
        option = "--" + name.replace("_", "-")
        kind = int if field.annotation is int else str
        if field.is_required():
            parser.add_argument(option, type=kind, required=True, help=field.description)
        else:
            parser.add_argument(option, type=kind, default=field.default, help=f"{field.description or name} (default {field.default})")
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in ProductionInstance.model_fields}
    try:
        settings = write_settings(args.home.resolve(), ProductionInstance(**values))
    except ValidationError as exc:
        parser.error(first_error(exc))
    except OSError as exc:
        parser.error(str(exc))
    print(f"wrote {settings}; set {PASSWORD_VARIABLE} and DAGSTER_HOME={settings.parent} for the daemon, the webserver and usdata-pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
