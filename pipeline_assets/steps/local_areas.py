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
from pipeline_assets.steps.datasets import load_dataset
from pipeline_assets.steps.h5io import open_for_write, table_columns, write_columns
from resources.files import atomic_path, sha256_file

CLONE_GEOGRAPHY = ("district", "state", "county")


Columns = dict[str, np.ndarray]  # a table as its columns: an area takes rows from each directly, no DataFrame per area


@dataclass(frozen=True)
class MemberRows:
    """Where each household's rows lie in a table of its members (persons or tax units): the rows
    in household order (`order`), and each household's first position in it and count, indexed by
    the household's row in the households table."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def index(cls, member_household_ids: np.ndarray, household_ids: np.ndarray) -> "MemberRows":
        owner = pd.Index(household_ids).get_indexer(member_household_ids)
        if (owner < 0).any():
            missing = member_household_ids[owner < 0][0]
            raise ValueError(f"member row with household_id {missing}: expected a household_id of the households table")
        counts = np.bincount(owner, minlength=len(household_ids))
        return cls(order=np.argsort(owner, kind="stable"), starts=np.cumsum(counts) - counts, counts=counts)

    def rows(self, households: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `households` (positions in the households table), each household's in table
        order, and how many each has."""
        counts = self.counts[households]
        first = np.repeat(self.starts[households] - (np.cumsum(counts) - counts), counts)
        return self.order[first + np.arange(counts.sum())], counts


@dataclass(frozen=True)
class AreaInputs:
    """What every area build reads, loaded once per worker, with the lookups an area needs indexed
    once (clones by state, district and county; members by household), so building an area costs
    in proportion to the area, not to the whole sample."""

    households: Columns
    members: dict[str, tuple[Columns, MemberRows]]  # HDF5 group -> (its table, rows by household)
    clones: Columns
    local_weights: np.ndarray
    national_weights: np.ndarray
    clones_by: dict[str, dict[str, np.ndarray]]


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
    clones = load_package_columns(package_path)
    household_ids = data.households["household_id"].to_numpy()
    return AreaInputs(
        households=table_columns(data.households),
        members={
            group: (table_columns(frame), MemberRows.index(frame["household_id"].to_numpy(), household_ids))
            for group, frame in (("tax_unit", data.tax_units), ("person", data.persons))
        },
        clones=table_columns(clones),
        local_weights=np.load(local_weights),
        national_weights=np.load(national_weights),
        clones_by={name: clones.groupby(name).indices for name in CLONE_GEOGRAPHY},
    )


def area_columns(area: geography.Area, inputs: AreaInputs) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of the clones in `area` with nonzero weight (national weights for the US file)."""
    empty = np.array([], dtype=int)
    if area.kind == "national":
        weights, inside = inputs.national_weights, np.arange(len(inputs.national_weights))
    elif area.kind == "city":
        weights = inputs.local_weights
        by_county = inputs.clones_by["county"]
        inside = np.sort(np.concatenate([by_county.get(c, empty) for c in geography.NYC_COUNTIES.values()]))
    else:
        weights = inputs.local_weights
        inside = inputs.clones_by[area.kind].get(area.code, empty)
    chosen = inside[weights[inside] > 0]
    return chosen, weights[chosen]


def _members(table: Columns, where: MemberRows, households: np.ndarray, clone_ids: np.ndarray) -> Columns:
    """The rows of `table` belonging to each chosen clone's household, re-keyed to the clone's record id."""
    rows, counts = where.rows(households)
    members = {name: values[rows] for name, values in table.items()}
    members["source_household_id"] = members["household_id"]
    members["household_id"] = np.repeat(clone_ids, counts)
    return members


def build_area_h5(area: geography.Area, inputs: AreaInputs, out_root: Path) -> AreaResult:
    chosen, weights = area_columns(area, inputs)
    households_at = inputs.clones["household_index"][chosen]
    households = {name: values[households_at] for name, values in inputs.households.items()}
    households["source_household_id"] = households["household_id"]
    households["household_id"] = chosen  # each clone is its own household record
    households["weight"] = weights
    for name in ("clone", *CLONE_GEOGRAPHY):
        households[name] = inputs.clones[name][chosen]

    out_path = out_root / area.relpath
    with atomic_path(out_path) as tmp, open_for_write(tmp) as h5:
        write_columns(h5.create_group("household"), households)
        for group, (table, where) in inputs.members.items():
            write_columns(h5.create_group(group), _members(table, where, households_at, chosen))
        write_columns(h5.create_group("area"), {"code": np.array([area.code]), "kind": np.array([area.kind])})
    population = float((households["n_persons"].astype(float) * weights).sum())
    return AreaResult(
        area=area.code,
        kind=area.kind,
        relpath=area.relpath,
        sha256=sha256_file(out_path),
        size_bytes=out_path.stat().st_size,
        households=len(chosen),
        weight_sum=float(weights.sum()),
        population=population,
    )
