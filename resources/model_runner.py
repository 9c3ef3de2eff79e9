"""The model's totals over area files, run by the model environment's interpreter.

A standalone script: it imports nothing of the project (the project's venv cannot import the model,
nor the model's venv the project). Request on stdin, {"period": 2024, "areas": ["states/AL.h5", ...]};
answer on stdout, one JSON object a line: first {"kind": "ready", ...} once policyengine_us is
imported (once, for all areas), then {"kind": "area", "path": ..., ...} per area as it finishes, so
a runner that dies part-way still leaves the areas it did. Anything the libraries print goes to
stderr, never into the answer.

    python model_runner.py <<< '{"period": 2024, "areas": ["states/AL.h5"]}'
    python model_runner.py --interpreter   # the interpreter's identity, as JSON

On Modal the model's image has no file of the run store: `from_bytes` takes the files' bytes and
answers the same lines in one list, with the interpreter the environment's identity is made of.
"""

import gc
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

# Each output's weighted total: MicroSeries.sum() weighs by household_weight projected to the
# variable's entity. person_count and household_count are 1 per person and household, so their
# totals are the weighted persons and households. snap is monthly: a year's request sums its months.
OUTPUTS = {
    "persons": "person_count",
    "households": "household_count",
    "income_tax": "income_tax",
    "eitc": "eitc",
    "snap": "snap",
    "household_net_income": "household_net_income",
}
LOCK_VARIABLE = "PIPELINE_MODEL_LOCK_SHA256"  # set in Modal's model image: the lock it was built from
LIBRARIES = ("policyengine-us", "policyengine-core", "numpy", "pandas", "h5py", "tables")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_request(text: str) -> tuple[int, list[str]]:
    """The period and the area paths; bad input is refused in one line naming the bad value."""
    try:
        request = json.loads(text)
    except ValueError:
        raise SystemExit(f"model_runner: the request is not JSON: {text[:80]!r}")
    if not isinstance(request, dict):
        raise SystemExit(f"model_runner: the request {text[:80]!r} is not a JSON object")
    period, areas = request.get("period"), request.get("areas")
    if isinstance(period, bool) or not isinstance(period, int) or not 1000 <= period <= 9999:
        raise SystemExit(f"model_runner: period {period!r} is not a year")
    if not isinstance(areas, list) or not areas or not all(isinstance(a, str) for a in areas):
        raise SystemExit(f"model_runner: areas {areas!r} is not a non-empty list of paths")
    return period, areas


def area_result(microsimulation, path: str, period: int) -> dict:
    """One area's totals, or the reason there are none (naming the file)."""
    result = {"kind": "area", "path": path}
    file = Path(path)
    if not file.is_file():
        return {**result, "error": f"{path}: no such file"}
    if file.suffix != ".h5":
        return {**result, "error": f"{path}: not an .h5 file (policyengine-core reads any other suffix as CSV)"}
    started = time.perf_counter()
    try:
        simulation = microsimulation(dataset=str(file))
    except Exception as exc:
        return {**result, "error": f"{path}: the model cannot load it: {first_line(exc)}"}
    result["load_seconds"] = round(time.perf_counter() - started, 3)
    periods = sorted(str(p) for p in simulation.get_holder("household_weight").get_known_periods())
    if str(period) not in periods:
        return {**result, "error": f"{path}: no household_weight for {period} (the file has {periods})"}
    import h5py  # the model's own dependency

    with h5py.File(file, "r") as h5:
        result["unknown_variables"] = sorted(set(h5.keys()) - set(simulation.tax_benefit_system.variables))
    started = time.perf_counter()
    for name, variable in OUTPUTS.items():
        try:
            result[name] = float(simulation.calculate(variable, period).sum())
        except Exception as exc:
            return {**result, "error": f"{path}: the model cannot compute {variable}: {first_line(exc)}"}
    # SNAP households: the weight of the SPM units the model gives any SNAP (the targets count households).
    snap = simulation.calculate("snap", period)
    result["snap_households"] = float(snap.weights[snap.values > 0].sum())
    result["compute_seconds"] = round(time.perf_counter() - started, 3)
    return result


def compute(period: int, paths: list[str], emit) -> None:
    """Import the model once, `emit` the ready line, then each area's line as it finishes."""
    started = time.perf_counter()
    from policyengine_us import Microsimulation

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    emit({"kind": "ready", "import_seconds": round(time.perf_counter() - started, 3), "library_versions": versions})
    for path in paths:
        emit(area_result(Microsimulation, path, period))
        gc.collect()  # one area's simulation at a time: 489 of them must not pile up


def interpreter() -> dict:
    """What the environment's identity is made of besides its lock (as the project's probe reads it)."""
    return {"implementation": platform.python_implementation(), "version": platform.python_version(),
            "platform": sysconfig.get_platform(), "libc": " ".join(platform.libc_ver())}


def from_bytes(files: dict[str, bytes], period: int) -> dict:
    """The lines for area files sent as bytes (name -> bytes, names as the sender knows the files);
    each area's path in the answer is its name."""
    if not files:
        raise ValueError("no area files sent")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, data in files.items():
            path = os.path.join(tmp, f"{len(paths)}-{os.path.basename(name)}")
            with open(path, "wb") as out:
                out.write(data)
            paths[path] = name
        compute(period, list(paths), lines.append)
    for line in lines:
        if line["kind"] == "area":
            local = line["path"]
            line["path"] = paths[local]
            if line.get("error"):
                line["error"] = line["error"].replace(local, line["path"])
    return {"lines": lines, "interpreter": interpreter()}


def serve(files: dict[str, bytes], period: int, lock_sha256: str) -> dict:
    """The body of Modal's model function: `from_bytes`, in an image built from the lock whose sha256
    the run asks for (its $PIPELINE_MODEL_LOCK_SHA256), else refused before any work."""
    built_from = os.environ.get(LOCK_VARIABLE)
    if built_from != lock_sha256:
        raise RuntimeError(f"this model image is built from the lock with sha256 {built_from}, the run's lock has "
                           f"{lock_sha256}: redeploy the model app from the run's checkout")
    return {**from_bytes(files, period), "image_id": os.environ.get("MODAL_IMAGE_ID"),
            "task_id": os.environ.get("MODAL_TASK_ID"), "region": os.environ.get("MODAL_REGION")}


def main() -> None:
    if sys.argv[1:] == ["--interpreter"]:
        print(json.dumps(interpreter()))
        return
    period, areas = read_request(sys.stdin.read())
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the model's libraries print (Python or C) goes to stderr
    compute(period, areas, lambda line: print(json.dumps(line), file=answer, flush=True))


if __name__ == "__main__":
    main()
