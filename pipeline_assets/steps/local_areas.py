"""One H5 file per local area: the household clones placed there with nonzero weight, and their
people, as a PolicyEngine-US dataset of the release period (steps/policyengine.py).

Each clone is a household of its own, with the geography it was placed in; its household_id is its
column in the calibration package (whose household_index names the sampled household it copies).
Tax units and persons are numbered afresh in each file, so a household cloned twice into one area
keeps its members apart. Workers load the run's inputs once (`load_area_inputs`) and then build
areas one by one with `build_area_h5`, so the same functions serve a local process pool and remote
(Modal) workers.
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
from pipeline_assets.steps.h5io import open_for_write, table_columns
from pipeline_assets.steps.policyengine import INPUTS_BY_ENTITY, marital_units, write_dataset
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
    members: dict[str, tuple[Columns, MemberRows]]  # entity -> (its table, rows by household)
    clones: Columns
    clone_geography: Columns  # per clone: state_fips, county_fips, congressional_district_geoid
    local_weights: np.ndarray
    national_weights: np.ndarray
    clones_by: dict[str, dict[str, np.ndarray]]
    period: int


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


def clone_geography(clones: pd.DataFrame) -> Columns:
    """Each clone's place as PolicyEngine codes it: state FIPS, five-digit county FIPS, and the
    district as SSDD (state FIPS x 100 + the district's number, at-large seats 01)."""
    state_fips = clones["state"].map(lambda state: int(geography.STATE_FIPS_BY_ABBREV[state])).to_numpy()
    fips_by_county = geography.county_fips()
    return {
        "state_fips": state_fips,
        "county_fips": clones["county"].map(fips_by_county).to_numpy().astype("S5"),
        "congressional_district_geoid": state_fips * 100 + clones["district"].map(geography.district_number).to_numpy(),
    }


def load_area_inputs(dataset_path: Path, package_path: Path, local_weights: Path, national_weights: Path) -> AreaInputs:
    data = load_dataset(dataset_path)
    clones = load_package_columns(package_path)
    household_ids = data.households["household_id"].to_numpy()
    # Each person's tax unit as its place among its household's tax units: a clone's persons link
    # to the clone's own copies of them.
    unit_rank = data.tax_units.groupby("household_id").cumcount().to_numpy()
    persons = data.persons.assign(tax_unit_rank=unit_rank[pd.Index(data.tax_units["tax_unit_id"]).get_indexer(data.persons["tax_unit_id"])])
    return AreaInputs(
        households=table_columns(data.households),
        members={
            entity: (table_columns(frame), MemberRows.index(frame["household_id"].to_numpy(), household_ids))
            for entity, frame in (("tax_unit", data.tax_units), ("person", persons))
        },
        clones=table_columns(clones),
        clone_geography=clone_geography(clones),
        local_weights=np.load(local_weights),
        national_weights=np.load(national_weights),
        clones_by={name: clones.groupby(name).indices for name in CLONE_GEOGRAPHY},
        period=data.period,
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


def area_variables(chosen: np.ndarray, weights: np.ndarray, inputs: AreaInputs) -> dict[str, np.ndarray]:
    """The area's variables, by entity: ids and links, then the inputs of the table."""
    households_at = inputs.clones["household_index"][chosen]
    units, unit_where = inputs.members["tax_unit"]
    persons, person_where = inputs.members["person"]
    unit_rows, units_per_clone = unit_where.rows(households_at)
    person_rows, persons_per_clone = person_where.rows(households_at)
    first_unit = np.cumsum(units_per_clone) - units_per_clone
    household_of_person = np.repeat(chosen, persons_per_clone)
    role = persons["tax_unit_role_input"][person_rows].astype("S")
    marital = marital_units(role)
    out = {
        "person_id": np.arange(len(person_rows)),
        "tax_unit_id": np.arange(len(unit_rows)),
        "spm_unit_id": chosen,
        "family_id": chosen,
        "marital_unit_id": np.arange(marital[-1] + 1 if len(marital) else 0),
        "household_id": chosen,
        "person_tax_unit_id": np.repeat(first_unit, persons_per_clone) + persons["tax_unit_rank"][person_rows],
        "person_spm_unit_id": household_of_person,
        "person_family_id": household_of_person,
        "person_marital_unit_id": marital,
        "person_household_id": household_of_person,
    }
    for spec in INPUTS_BY_ENTITY["person"]:
        out[spec.variable] = role if spec.variable == "tax_unit_role_input" else persons[spec.variable][person_rows]
    for spec in INPUTS_BY_ENTITY["tax_unit"]:
        out[spec.variable] = units[spec.variable][unit_rows]
    for spec in INPUTS_BY_ENTITY["spm_unit"]:
        out[spec.variable] = inputs.households[spec.variable][households_at]
    out["household_weight"] = weights.astype(np.float32)
    for name, values in inputs.clone_geography.items():
        out[name] = values[chosen]
    return out


def build_area_h5(area: geography.Area, inputs: AreaInputs, out_root: Path) -> AreaResult:
    chosen, weights = area_columns(area, inputs)
    variables = area_variables(chosen, weights, inputs)
    out_path = out_root / area.relpath
    with atomic_path(out_path) as tmp, open_for_write(tmp) as h5:
        h5.attrs["area_code"] = np.bytes_(area.code)
        h5.attrs["area_kind"] = np.bytes_(area.kind)
        write_dataset(h5, inputs.period, variables)
    # What the file holds: the weights as written (float32), over the persons of each household.
    written = variables["household_weight"].astype(float)
    persons = inputs.households["n_persons"][inputs.clones["household_index"][chosen]]
    return AreaResult(
        area=area.code,
        kind=area.kind,
        relpath=area.relpath,
        sha256=sha256_file(out_path),
        size_bytes=out_path.stat().st_size,
        households=len(chosen),
        weight_sum=float(written.sum()),
        population=float((persons * written).sum()),
    )
