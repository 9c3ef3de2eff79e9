"""The model's totals over area files, run by the model environment's interpreter.

A standalone script: it imports nothing of the project (the project's venv cannot import the model,
nor the model's venv the project). Request on stdin, {"period": 2024, "areas": ["states/AL.h5", ...]};
answer on stdout, one JSON object a line: first {"kind": "ready", ...} once policyengine_us is
imported (once, for all areas), then {"kind": "area", "path": ..., ...} per area as it finishes, so
a runner that dies part-way still leaves the areas it did. Anything the libraries print goes to
stderr, never into the answer.

    python model_runner.py <<< '{"period": 2024, "areas": ["states/AL.h5"]}'
"""

import gc
import json
import os
import sys
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


def main() -> None:
    period, areas = read_request(sys.stdin.read())
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the model's libraries print (Python or C) goes to stderr
    started = time.perf_counter()
    from policyengine_us import Microsimulation

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    ready = {"kind": "ready", "import_seconds": round(time.perf_counter() - started, 3), "library_versions": versions}
    print(json.dumps(ready), file=answer, flush=True)
    for path in areas:
        print(json.dumps(area_result(Microsimulation, path, period)), file=answer, flush=True)
        gc.collect()  # one area's simulation at a time: 489 of them must not pile up


if __name__ == "__main__":
    main()
