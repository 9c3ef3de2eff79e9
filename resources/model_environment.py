"""The PolicyEngine-US model environment: a virtualenv of its own, built once from a lock file.

policyengine-us 2.68.0 needs pandas >= 3 and the project's dagster-gcp pandas < 3, so the model cannot
be imported in the project's venv. It lives in a virtualenv of the lock's exact pins, in a directory
named for what defines it (`env_id`: the lock's bytes and the interpreter), shared by every run and
configuration on the machine; the project talks to it through `model_runner.py` over JSON.

`python -m resources.model_environment build` builds it (what `make model-env` runs);
`python -m resources.model_environment run --period 2024 FILE...` computes on area files.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from resources.compute import stripes

DEFAULT_LOCK = Path(__file__).resolve().parents[1] / "pipeline_assets" / "data" / "model_environment" / "requirements.lock"
RUNNER = Path(__file__).resolve().with_name("model_runner.py")
ROOT_VARIABLE = "PIPELINE_MODEL_ENVS"
RECORD = "environment.json"  # written last, inside the build directory: its presence is "built"
BUILD_LOG = "build.log"
# The versions recorded for provenance (the python version is recorded as well).
TRACKED_LIBRARIES = ("policyengine-us", "policyengine-core", "numpy", "pandas", "h5py", "tables")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")
_INSTALLED_PROBE = (
    "import json, platform; from importlib import metadata; print(json.dumps({'python': platform.python_version(), "
    "'distributions': {d.metadata['Name']: d.version for d in metadata.distributions()}}))"
)


class ModelEnvironmentError(RuntimeError):
    """The environment could not be built or run; the message is one line naming the step."""


class Interpreter(BaseModel):
    model_config = ConfigDict(frozen=True)

    implementation: str
    version: str
    platform: str
    libc: str


class EnvironmentRecord(BaseModel):
    """What was built, for provenance: written as environment.json inside the environment."""

    model_config = ConfigDict(frozen=True)

    env_id: str
    path: str
    lock_sha256: str
    interpreter: Interpreter
    python_version: str
    library_versions: dict[str, str | None]
    built_at: str
    build_seconds: float


class ModelRun(BaseModel):
    env_id: str
    period: int
    import_seconds: float
    library_versions: dict[str, str | None]
    areas: list[dict]  # per area file: the runner's figures (path, persons, ..., error); the step reads them
    ran_on: list[str]  # each runner: a local process on a host, or a Modal container


def default_root() -> Path:
    """$PIPELINE_MODEL_ENVS, else the user's cache directory: one environment per machine, not per checkout."""
    if os.environ.get(ROOT_VARIABLE):
        return Path(os.environ[ROOT_VARIABLE]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "usdata-pipeline" / "model-envs"


def parse_lock(text: str, where: Path) -> dict[str, str]:
    """The lock's pins by normalized name; a line that is not `name==version` is refused."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ModelEnvironmentError(f"line {number} of {where} is not name==version: {line!r}")
        pins[normalize(match[1])] = match[2]
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_id_of(lock_sha256: str, interpreter: Interpreter) -> str:
    """sha256 of the lock's bytes' sha256 and the interpreter's implementation, version and platform:
    everything an environment's contents follow from (pins are exact and installed without a
    resolver), wherever it is built (here, or Modal's image)."""
    identity = {"lock_sha256": lock_sha256, "interpreter": interpreter.model_dump()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def interpreter(python: str) -> Interpreter:
    try:
        # Asked of the interpreter in question, so env_id names what the environment is built on, not
        # the path it was reached by.
        done = subprocess.run([python, "-I", str(RUNNER), "--interpreter"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ModelEnvironmentError(f"interpreter {python!r} does not run: {_last_line(str(exc))}") from None
    return Interpreter.model_validate_json(done.stdout)


@contextmanager
def _exclusive(path: Path):
    """An exclusive lock on `path` (fcntl): one process builds, the others wait and then reuse its build."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _last_line(output: str) -> str:
    """pip's last ERROR line (it names the package), else the output's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


class ModelEnvironment(BaseModel):
    """The virtualenv at `<root>/<env_id>`, built from `lock` on `python` by `installer` (a pip that
    takes `--python`; tests inject a fake one), running `runner` on area files."""

    model_config = ConfigDict(frozen=True)

    lock: Path = DEFAULT_LOCK
    root: Path = Field(default_factory=default_root)
    python: str = sys.executable
    installer: tuple[str, ...] = (sys.executable, "-m", "pip")
    runner: Path = RUNNER  # the script the environment's interpreter runs on the files (tests: a stand-in)

    def lock_bytes(self) -> bytes:
        try:
            return self.lock.read_bytes()
        except OSError:
            raise ModelEnvironmentError(f"no model environment lock file at {self.lock}") from None

    def lock_sha256(self) -> str:
        return hashlib.sha256(self.lock_bytes()).hexdigest()

    def env_id(self) -> str:
        return env_id_of(self.lock_sha256(), interpreter(self.python))

    @property
    def path(self) -> Path:
        return self.root / self.env_id()

    @property
    def env_python(self) -> Path:
        """The environment's interpreter: the only way in. Console scripts in its bin/ carry the build
        directory's path in their shebangs, which the final rename leaves behind."""
        return self.path / "bin" / "python"

    def built(self) -> EnvironmentRecord | None:
        try:
            return EnvironmentRecord.model_validate_json((self.path / RECORD).read_bytes())
        except (OSError, ValueError):
            return None

    def ensure(self) -> EnvironmentRecord:
        """The built environment, building it first if there is none. Reusing one runs no installer
        and downloads nothing."""
        record = self.built()
        if record is not None:
            return record
        env_id = self.env_id()
        self.root.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.root / f".{env_id}.lock"):
            record = self.built()  # another process may have built it while this one waited
            if record is not None:
                return record
            return self._build(env_id)

    def _build(self, env_id: str) -> EnvironmentRecord:
        """Builds in a sibling directory and renames it into place: a crashed build leaves only a
        `.building-*` directory, which is not the environment and is removed by the next build."""
        started = time.monotonic()
        pins = parse_lock(self.lock_bytes().decode(), self.lock)
        for stale in self.root.glob(f".{env_id}.building-*"):  # a crashed build's (its pip may live on)
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.root / f".{env_id}.building-{os.getpid()}"
        log = self.root / f"{env_id}.{BUILD_LOG}"
        python = str(staging / "bin" / "python")
        try:
            with open(log, "w") as out:
                self._step(out, log, "creating the virtualenv", [self.python, "-m", "venv", "--without-pip", str(staging)])
                self._step(out, log, f"pip install --no-deps -r {self.lock}",
                           [*self.installer, "--python", python, "install", "--no-deps", "--no-input",
                            "--disable-pip-version-check", "-r", str(self.lock)])
                self._step(out, log, "pip check (the lock misses a dependency)",
                           [*self.installer, "--python", python, "check"])
                installed = json.loads(self._step(out, log, "reading the installed versions", [python, "-I", "-c", _INSTALLED_PROBE]))
            versions = {normalize(name): version for name, version in installed["distributions"].items()}
            differences = sorted(f"{name} {versions.get(name)} (lock: {pins.get(name)})"
                                 for name in set(pins) | set(versions) if pins.get(name) != versions.get(name))
            if differences:
                raise ModelEnvironmentError(f"model environment {env_id[:12]}: the installed set differs from "
                                            f"{self.lock}: {', '.join(differences)}")
            record = EnvironmentRecord(
                env_id=env_id, path=str(self.root / env_id), lock_sha256=self.lock_sha256(),
                interpreter=interpreter(self.python), python_version=installed["python"],
                library_versions={name: versions.get(name) for name in TRACKED_LIBRARIES},
                built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                build_seconds=round(time.monotonic() - started, 1),
            )
            os.replace(log, staging / BUILD_LOG)
            (staging / RECORD).write_text(record.model_dump_json(indent=2) + "\n")
            final = self.root / env_id
            if final.exists():  # a directory without a readable record is not a built environment
                shutil.rmtree(final)
            os.rename(staging, final)
            return record
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _step(self, out, log: Path, step: str, command: list[str]) -> str:
        """One build step, its output appended to the build log; its stdout, or a one-line error."""
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        # From the environments' root: a checkout's own metadata (usdata_pipeline.egg-info) in the
        # working directory would otherwise count as installed in the environment.
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root)
        out.write(done.stdout + done.stderr)
        out.flush()
        if done.returncode != 0:
            raise ModelEnvironmentError(f"model environment build failed at {step} (exit {done.returncode}): "
                                        f"{_last_line(done.stdout + done.stderr)} (log: {log})")
        return done.stdout

    def run(self, areas: Sequence[str | Path], period: int, timeout: float | None = None, workers: int = 1) -> ModelRun:
        """The model's totals for each area file, in the order given, from `workers` runner processes
        at once (each imports the model once and takes every `workers`-th file). A file the model
        cannot load is an error in its own result; so is every area after a runner died, if one does."""
        if isinstance(period, bool) or not isinstance(period, int) or not 1000 <= period <= 9999:
            raise ValueError(f"period {period!r} is not a year")
        if isinstance(areas, (str, Path)) or not areas:
            raise ValueError(f"areas {areas!r}: expected a non-empty list of area file paths")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers {workers!r}: expected a whole number of at least 1")
        paths = [str(Path(area).resolve()) for area in areas]
        record = self.ensure()
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        environment["HF_HUB_OFFLINE"] = "1"  # the model reads the files given; it downloads nothing
        chunks = stripes(paths, workers)
        runners = [
            subprocess.Popen([str(self.env_python), "-I", str(self.runner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=environment)
            for _ in chunks
        ]
        with ThreadPoolExecutor(len(runners)) as threads:
            answers = list(threads.map(lambda runner, chunk: _answer(runner, {"period": period, "areas": chunk}, timeout),
                                       runners, chunks))
        return model_run(record.env_id, period, paths, chunks, [
            RunnerAnswer(lines=lines, ran_on=f"local pid {runner.pid} on {socket.gethostname()}",
                         died=f"the model runner exited with code {returncode} before this area: {_last_line(stderr)}")
            for runner, (lines, returncode, stderr) in zip(runners, answers)
        ])


@dataclass
class RunnerAnswer:
    """What one runner (a local process or a Modal container) sent back for its chunk of the areas."""

    lines: list[dict]  # its JSON lines: one `ready`, then one `area` per file it computed
    ran_on: str
    died: str  # why an area of its chunk has no line


def model_run(env_id: str, period: int, paths: list[str], chunks: list[list[str]], answers: list[RunnerAnswer]) -> ModelRun:
    """One ModelRun of the runners' answers, each for its chunk of `paths`: an area with no line is an
    error in its own result; a runner that never got ready, or answered for areas it was not sent, fails."""
    readies, results = [], {}
    for chunk, answer in zip(chunks, answers):
        ready = next((line for line in answer.lines if line["kind"] == "ready"), None)
        if ready is None:
            raise ModelEnvironmentError(f"the model runner on {answer.ran_on} failed before its first area: {answer.died}")
        readies.append(ready)
        found = {line["path"]: {k: v for k, v in line.items() if k != "kind"} for line in answer.lines if line["kind"] == "area"}
        if unasked := sorted(set(found) - set(chunk)):
            raise ModelEnvironmentError(f"the model runner on {answer.ran_on} returned areas it was not sent: {unasked}")
        results.update({path: found.get(path) or {"path": path, "error": f"{path}: {answer.died}"} for path in chunk})
    return ModelRun(env_id=env_id, period=period, import_seconds=max(r["import_seconds"] for r in readies),
                    library_versions=readies[0]["library_versions"], areas=[results[path] for path in paths],
                    ran_on=[answer.ran_on for answer in answers])


def _answer(runner: subprocess.Popen, request: dict, timeout: float | None) -> tuple[list[dict], int, str]:
    """One runner's JSON lines, exit code and stderr; killed past `timeout` (the areas it did are kept)."""
    try:
        stdout, stderr = runner.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired:
        runner.kill()
        stdout, stderr = runner.communicate()
        stderr += f"\nran past {timeout} s"
    lines = []
    for line in stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # the last line of a runner killed while writing it
            pass
    return lines, runner.returncode, stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resources.model_environment", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help=f"where environments live (default ${ROOT_VARIABLE} or {default_root()})")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the environment unless it exists")
    run = commands.add_parser("run", help="compute the model's totals on area files (JSON on stdout)")
    run.add_argument("--period", type=int, required=True)
    run.add_argument("areas", nargs="+", type=Path)
    args = parser.parse_args(argv)
    environment = ModelEnvironment(lock=args.lock, **({"root": args.root} if args.root else {}))
    try:
        if args.command == "build":
            reused = environment.built() is not None
            started = time.monotonic()
            record = environment.ensure()
            versions = ", ".join(f"{name} {version}" for name, version in record.library_versions.items())
            how = "reused" if reused else f"built in {time.monotonic() - started:.0f} s"
            print(f"model environment {record.env_id[:12]} at {record.path}: {how} (python {record.python_version}, {versions})")
        else:
            print(environment.run(args.areas, args.period).model_dump_json(indent=2))
    except ValueError as exc:
        print(f"model-environment: error: {exc}", file=sys.stderr)
        return 2
    except ModelEnvironmentError as exc:
        print(f"model-environment: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
