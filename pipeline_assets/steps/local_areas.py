"""One H5 file per local area: the household clones placed there with nonzero weight, and their people.

Workers load the run's inputs once (`load_area_inputs`) and then build areas one by one with
`build_area_h5`, so the same functions serve a local process pool and remote (Modal) workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from pipeline_assets.steps import geography
from pipeline_assets.steps.calibration import load_package_columns
from pipeline_assets.steps.datasets import Dataset, load_dataset
from pipeline_assets.steps.h5io import open_for_write, write_columns, write_frame
from resources.files import atomic_path, sha256_file

CLONE_GEOGRAPHY = ("district", "state", "county")


@dataclass(frozen=True)
class AreaInputs:
    """What every area build reads, loaded once per worker, with the lookups an area needs indexed
    once (clones by state, district and county; people and tax units by household), so building an
    area costs in proportion to the area, not to the whole sample."""

    data: Dataset
    columns: pd.DataFrame
    local_weights: np.ndarray
    national_weights: np.ndarray
    clones_by: dict[str, dict[str, np.ndarray]]
    rows_by_household: dict[str, dict[int, np.ndarray]]


class AreaResult(BaseModel):
    area: str
    kind: str
    relpath: str
    sha256: str
    size_bytes: int
    households: int
    weight_sum: float
    population: float
    reused_from: str | None = None  # the run whose identical file this run took instead of building it


def load_area_inputs(dataset_path: Path, package_path: Path, local_weights: Path, national_weights: Path) -> AreaInputs:
    data = load_dataset(dataset_path)
    columns = load_package_columns(package_path)
    return AreaInputs(
        data=data,
        columns=columns,
        local_weights=np.load(local_weights),
        national_weights=np.load(national_weights),
        clones_by={name: columns.groupby(name).indices for name in CLONE_GEOGRAPHY},
        rows_by_household={
            "persons": data.persons.groupby("household_id").indices,
            "tax_units": data.tax_units.groupby("household_id").indices,
        },
    )


def area_columns(area: geography.Area, inputs: AreaInputs) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of the clones in `area` with nonzero weight (national weights for the US file)."""
    empty = np.array([], dtype=int)
    if area.kind == "national":
        weights, inside = inputs.national_weights, np.arange(len(inputs.columns))
    elif area.kind == "city":
        weights = inputs.local_weights
        by_county = inputs.clones_by["county"]
        inside = np.sort(np.concatenate([by_county.get(c, empty) for c in geography.NYC_COUNTIES.values()]))
    else:
        weights = inputs.local_weights
        inside = inputs.clones_by[area.kind].get(area.code, empty)
    chosen = inside[weights[inside] > 0]
    return chosen, weights[chosen]


def _members(frame: pd.DataFrame, positions: dict[int, np.ndarray], household_ids: np.ndarray, clone_ids: np.ndarray) -> pd.DataFrame:
    """Rows of `frame` belonging to each chosen clone's household, re-keyed to the clone's record id."""
    parts = [positions[h] for h in household_ids]
    counts = np.array([len(p) for p in parts], dtype=int)
    rows = frame.iloc[np.concatenate(parts) if parts else np.array([], dtype=int)].reset_index(drop=True)
    rows["source_household_id"] = rows["household_id"]
    rows["household_id"] = np.repeat(clone_ids, counts)
    return rows


def build_area_h5(area: geography.Area, inputs: AreaInputs, out_root: Path) -> AreaResult:
    chosen, weights = area_columns(area, inputs)
    clone_rows = inputs.columns.iloc[chosen]
    households = inputs.data.households.iloc[clone_rows["household_index"].to_numpy()].reset_index(drop=True)
    source_ids = households["household_id"].to_numpy()
    households["source_household_id"] = source_ids
    households["household_id"] = chosen  # each clone is its own household record
    households["weight"] = weights
    households["clone"] = clone_rows["clone"].to_numpy()
    for name in CLONE_GEOGRAPHY:
        households[name] = clone_rows[name].to_numpy()
    persons = _members(inputs.data.persons, inputs.rows_by_household["persons"], source_ids, chosen)
    tax_units = _members(inputs.data.tax_units, inputs.rows_by_household["tax_units"], source_ids, chosen)

    out_path = out_root / area.relpath
    with atomic_path(out_path) as tmp, open_for_write(tmp) as h5:
        write_frame(h5.create_group("household"), households)
        write_frame(h5.create_group("tax_unit"), tax_units)
        write_frame(h5.create_group("person"), persons)
        write_columns(h5.create_group("area"), {"code": np.array([area.code]), "kind": np.array([area.kind])})
    population = float((households["n_persons"].to_numpy(float) * weights).sum())
    return AreaResult(
        area=area.code,
        kind=area.kind,
        relpath=area.relpath,
        sha256=sha256_file(out_path),
        size_bytes=out_path.stat().st_size,
        households=len(households),
        weight_sum=float(weights.sum()),
        population=population,
    )
