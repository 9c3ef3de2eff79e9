"""The PolicyEngine-US model environment: its identity, its one atomic build, its reuse, and the
model run on area files.

All but the last test build cheap environments: an empty lock, installed by a fake pip, into a root
of the test's own. The last runs the real environment (`make model-env` builds it; the test builds
it if it is missing) on tiny files of tests/policyengine_dataset.py, in one runner process.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resources import model_environment
from resources.model_environment import Interpreter, ModelEnvironment, ModelEnvironmentError
from tests.policyengine_dataset import DEFAULT_WEIGHTS, PERIOD, write_area, write_entity_tables

REPO = Path(__file__).resolve().parents[1]
# A pip that installs nothing: it counts its installs, sleeps, or fails as pip does, as asked.
FAKE_PIP = """
import sys, time
args = sys.argv[1:]
option = lambda name: args[args.index(name) + 1] if name in args else None
if "install" in args:
    if option("--count"):
        with open(option("--count"), "a") as count:
            count.write("install\\n")
    time.sleep(float(option("--sleep") or 0))
    if "--fail" in args:
        sys.exit("ERROR: No matching distribution found for nosuchpackage==0.0.1")
"""
# A runner that computes nothing: each area's "persons" is its position in its runner's request, and
# a path naming "die" kills the runner before it answers for that area.
FAKE_RUNNER = """
import json, os, sys
request = json.load(sys.stdin)
print(json.dumps({"kind": "ready", "import_seconds": 0.5, "library_versions": {"policyengine-us": "0.0.0"}}), flush=True)
for position, path in enumerate(request["areas"]):
    if "die" in path:
        sys.exit("killed while computing")
    print(json.dumps({"kind": "area", "path": path, "persons": position, "households": os.getpid()}), flush=True)
"""
ENSURE = """
import sys
from pathlib import Path
from resources.model_environment import ModelEnvironment
root, lock, *installer = sys.argv[1:]
print(ModelEnvironment(root=Path(root), lock=Path(lock), installer=tuple(installer)).ensure().path)
"""


@pytest.fixture
def fake(tmp_path):
    """(root, lock, installer(*options)): an empty lock and a fake pip, for cheap environments."""
    lock = tmp_path / "empty.lock"
    lock.write_text("# nothing pinned\n")
    pip = tmp_path / "fake_pip.py"
    pip.write_text(FAKE_PIP)
    return tmp_path / "envs", lock, lambda *options: (sys.executable, str(pip), *options)


def environment(fake, *options) -> ModelEnvironment:
    root, lock, installer = fake
    return ModelEnvironment(root=root, lock=lock, installer=installer(*options))


def ensure_in_a_process(fake, *options) -> subprocess.Popen:
    root, lock, installer = fake
    return subprocess.Popen([sys.executable, "-c", ENSURE, str(root), str(lock), *installer(*options)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_env_id_follows_the_lock_bytes_and_the_interpreter(fake, tmp_path, monkeypatch):
    _, lock, _ = fake
    first = ModelEnvironment(lock=lock).env_id()
    assert ModelEnvironment(lock=lock, root=tmp_path / "elsewhere").env_id() == first  # not the root
    copy = tmp_path / "copy.lock"
    copy.write_bytes(lock.read_bytes())
    assert ModelEnvironment(lock=copy).env_id() == first  # the bytes, not the path
    copy.write_text("# nothing pinned\nsix==1.17.0\n")
    assert ModelEnvironment(lock=copy).env_id() != first
    other = Interpreter(implementation="CPython", version="3.12.1", platform="linux-x86_64", libc="glibc 2.36")
    monkeypatch.setattr(model_environment, "interpreter", lambda python: other)
    assert ModelEnvironment(lock=lock).env_id() != first


def test_ensure_builds_once_and_every_later_call_reuses_it(fake):
    root, _, _ = fake
    count = root.parent / "installs"
    record = environment(fake, "--count", str(count)).ensure()
    marker = Path(record.path) / model_environment.RECORD
    built_at = marker.stat().st_mtime_ns
    assert Path(record.path) == root / record.env_id and (Path(record.path) / "bin" / "python").exists()
    started = time.monotonic()
    again = environment(fake, "--count", str(count), "--fail").ensure()  # another configuration: never installs
    assert time.monotonic() - started < 0.5
    assert again == record and marker.stat().st_mtime_ns == built_at
    assert count.read_text() == "install\n"
    assert sorted(p.name for p in root.iterdir()) == [f".{record.env_id}.lock", record.env_id]


def test_a_failed_build_leaves_nothing_built_and_says_which_step(fake):
    root, _, _ = fake
    failing = environment(fake, "--fail")
    with pytest.raises(ModelEnvironmentError) as failure:
        failing.ensure()
    message = str(failure.value)
    assert "\n" not in message and "pip install --no-deps -r" in message and "nosuchpackage==0.0.1" in message
    assert failing.built() is None and not failing.path.exists()
    assert not list(root.glob(".*.building-*"))
    assert environment(fake).ensure().env_id == failing.env_id()  # the next build is not in its way


def test_a_killed_build_is_not_counted_as_built(fake):
    root, _, _ = fake
    count = root.parent / "installs"
    build = ensure_in_a_process(fake, "--count", str(count), "--sleep", "60")
    deadline = time.monotonic() + 60
    while not count.exists() and time.monotonic() < deadline:  # killed mid-install
        time.sleep(0.05)
    os.killpg(build.pid, signal.SIGKILL)  # the build and its pip
    build.wait()
    killed = environment(fake)
    assert killed.built() is None and not killed.path.exists()
    (staging,) = root.glob(".*.building-*")
    assert (staging / "bin" / "python").exists()  # a half environment, under a name that is not built
    assert killed.ensure().env_id == killed.env_id()
    assert not staging.exists()


def test_two_processes_asking_at_once_build_once(fake):
    root, _, _ = fake
    count = root.parent / "installs"
    builds = [ensure_in_a_process(fake, "--count", str(count), "--sleep", "2") for _ in range(2)]
    outputs = [build.communicate(timeout=120) for build in builds]
    assert [build.returncode for build in builds] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] == f"{environment(fake).path}\n"
    assert count.read_text() == "install\n"


def test_bad_input_is_refused_in_one_line(fake, tmp_path):
    root, lock, _ = fake
    lock.write_text("policyengine-us>=2.68\n")
    cli = subprocess.run([sys.executable, "-m", "resources.model_environment", "--root", str(root), "--lock", str(lock),
                          "build"], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 1
    assert cli.stderr == f"model-environment: error: line 1 of {lock} is not name==version: 'policyengine-us>=2.68'\n"
    missing = tmp_path / "missing.lock"
    with pytest.raises(ModelEnvironmentError, match=f"no model environment lock file at {missing}"):
        ModelEnvironment(lock=missing).ensure()
    with pytest.raises(ValueError, match="period '2024' is not a year"):
        environment(fake).run([tmp_path / "a.h5"], "2024")
    with pytest.raises(ValueError, match=r"areas \[\]: expected a non-empty list"):
        environment(fake).run([], PERIOD)
    with pytest.raises(ValueError, match="workers 0: expected a whole number of at least 1"):
        environment(fake).run([tmp_path / "a.h5"], PERIOD, workers=0)


def test_the_areas_are_dealt_to_the_workers_and_come_back_in_order(fake, tmp_path):
    """`all` in production: several runners at once, each over every n-th file; a runner that dies
    costs its own remaining areas only, each of which says why."""
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    root, lock, installer = fake
    model = ModelEnvironment(root=root, lock=lock, installer=installer(), runner=runner)
    paths = [tmp_path / f"{name}.h5" for name in ("a", "b", "c", "die", "e", "f", "g")]
    run = model.run(paths, PERIOD, workers=3)
    assert [Path(area["path"]).name for area in run.areas] == [path.name for path in paths]
    assert len(run.ran_on) == 3 and len({ran.split()[2] for ran in run.ran_on}) == 3
    # Dealt round-robin: a, die, g to the first runner; b, e to the second; c, f to the third.
    assert [area["persons"] for area in run.areas if "error" not in area] == [0, 0, 0, 1, 1]
    pids = {Path(area["path"]).stem: area.get("households") for area in run.areas}
    assert pids["b"] == pids["e"] and pids["c"] == pids["f"] and len({pids["a"], pids["b"], pids["c"]}) == 3
    died = {Path(area["path"]).stem: area["error"] for area in run.areas if "error" in area}
    assert sorted(died) == ["die", "g"]
    assert died["g"].endswith("the model runner exited with code 1 before this area: killed while computing")
    assert run.env_id == model.env_id() and run.library_versions == {"policyengine-us": "0.0.0"}


def test_the_model_computes_each_area_and_reports_a_file_it_cannot_load(tmp_path):
    alabama = write_area(tmp_path / "AL.h5")
    other = write_area(tmp_path / "CA.h5", weights=(10.0, 20.0, 30.0))
    old = write_entity_tables(tmp_path / "old.h5")
    last_year = write_area(tmp_path / "2023.h5", period=PERIOD - 1)
    model = ModelEnvironment()
    model.ensure()  # `make model-env` built it; this builds it where it did not run
    run = model.run([alabama.path, other.path, old, last_year.path], PERIOD)
    assert run.library_versions["policyengine-us"] == "2.68.0" and run.period == PERIOD
    results = {Path(area["path"]).name: area for area in run.areas}
    for fixture in (alabama, other):
        result = results[fixture.path.name]
        assert result.get("error") is None and result["unknown_variables"] == []
        assert result["persons"] == pytest.approx(fixture.persons) and result["households"] == pytest.approx(fixture.households)
        assert all(math.isfinite(v) for v in (result[m] for m in ("income_tax", "eitc", "snap", "household_net_income")))
    # The single parent of two earning $18,000 is on the EITC's plateau: 2024's $6,960, and no one
    # else in the fixture gets any. The inputs reached the model, weighted per file.
    assert results["AL.h5"]["eitc"] == pytest.approx(DEFAULT_WEIGHTS[1] * 6960)
    assert results["CA.h5"]["eitc"] == pytest.approx(20.0 * 6960)
    assert results["old.h5"]["error"] == (f"{old.resolve()}: the model cannot load it: AssertionError: Missing person_id column in "
                                       "the dataset. Each person entity must have an ID array defined for ETERNITY.")
    assert results["2023.h5"]["error"] == f"{last_year.path.resolve()}: no household_weight for {PERIOD} (the file has ['2023'])"
    assert os.path.samefile(Path(run.areas[0]["path"]), alabama.path)  # results in the order asked
