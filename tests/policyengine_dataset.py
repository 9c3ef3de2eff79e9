"""Tiny area files in policyengine-core's TIME_PERIOD_ARRAYS layout, written with h5py alone, for
the tests that run the model on them; and one in the entity-table layout the model refuses.

What the loader needs (policyengine-core 3.33.12's Dataset.from_file and Simulation.build_from_dataset,
policyengine-us 2.68.0's Microsimulation): an `.h5` file whose first top-level key is a group (else
it is read as ARRAYS, one dataset per variable); one group per variable, one dataset per period
named as the period ("2024"); `{entity}_id` for the six entities and `person_{entity}_id` for the
five group entities, read from each group's first period; every link naming an id of its entity by
value; group variables in the order of their entity's id array. No role arrays: every person gets
the model's default role, "member". Enum inputs are byte strings of the enum's names (b"JOINT",
b"HEAD"), str inputs (county_fips) byte strings too; numbers in any dtype (the model casts them to
its own: float32, int32). No top-level key may be an entity's name (person, household, ...): such a
file is taken for an entity-table HDFStore.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from pydantic import BaseModel

PERIOD = 2024
# Three households: a married couple with a child and an elderly single person in Alabama, a single
# parent of two in Los Angeles County. One tax unit, SPM unit and family per household; the couple
# is one marital unit, everyone else their own.
PERSONS_PER_HOUSEHOLD = (3, 3, 1)
DEFAULT_WEIGHTS = (120.5, 75.25, 210.0)
HOUSEHOLD_IDS = np.array([101, 102, 103], np.int32)  # ids are matched by value: they need not be 0, 1, ...
PERSON_VARIABLES = {
    "age": np.array([40, 38, 6, 33, 9, 4, 72], np.float32),
    "tax_unit_role_input": np.array([b"HEAD", b"SPOUSE", b"DEPENDENT", b"HEAD", b"DEPENDENT", b"DEPENDENT", b"HEAD"]),
    "is_blind": np.zeros(7, bool),
    "employment_income_before_lsr": np.array([45_000, 12_000, 0, 18_000, 0, 0, 0], np.float32),
    "self_employment_income_before_lsr": np.zeros(7, np.float32),
    "taxable_interest_income": np.array([300, 0, 0, 0, 0, 0, 1_200], np.float32),
    "social_security_retirement": np.array([0, 0, 0, 0, 0, 0, 14_000], np.float32),
}
LINKS = {
    "person_tax_unit_id": np.array([0, 0, 0, 1, 1, 1, 2], np.int32),
    "person_spm_unit_id": np.array([0, 0, 0, 1, 1, 1, 2], np.int32),
    "person_family_id": np.array([0, 0, 0, 1, 1, 1, 2], np.int32),
    "person_marital_unit_id": np.array([0, 0, 1, 2, 3, 4, 5], np.int32),
    "person_household_id": np.repeat(HOUSEHOLD_IDS, PERSONS_PER_HOUSEHOLD),
}


class FixtureArea(BaseModel):
    """A written file and the weighted totals the model must find in it."""

    path: Path
    persons: float
    households: float


def write_area(path: Path, weights: tuple[float, float, float] = DEFAULT_WEIGHTS, period: int = PERIOD) -> FixtureArea:
    """The three households with the given weights, as /variable/period arrays."""
    weight = np.array(weights, np.float32)
    variables = {
        "person_id": np.arange(7, dtype=np.int32),
        "tax_unit_id": np.arange(3, dtype=np.int32),
        "spm_unit_id": np.arange(3, dtype=np.int32),
        "family_id": np.arange(3, dtype=np.int32),
        "marital_unit_id": np.arange(6, dtype=np.int32),
        "household_id": HOUSEHOLD_IDS,
        **LINKS,
        **PERSON_VARIABLES,
        "filing_status": np.array([b"JOINT", b"HEAD_OF_HOUSEHOLD", b"SINGLE"]),
        "spm_unit_pre_subsidy_childcare_expenses": np.array([0, 4_000, 0], np.float32),
        "household_weight": weight,
        "state_fips": np.array([1, 6, 1], np.int32),
        "county_fips": np.array([b"01001", b"06037", b"01073"]),
        "congressional_district_geoid": np.array([101, 634, 107], np.int32),
    }
    with h5py.File(path, "w") as h5:
        for name, values in variables.items():
            h5.create_dataset(f"{name}/{period}", data=values)
    persons = float(np.dot(weight.astype(np.float64), PERSONS_PER_HOUSEHOLD))
    return FixtureArea(path=path, persons=persons, households=float(weight.astype(np.float64).sum()))


def write_entity_tables(path: Path) -> Path:
    """The same households as one table per entity (/household/household_weight, ...), the layout
    the area files had before they were PolicyEngine datasets: the model finds no person_id in it."""
    with h5py.File(path, "w") as h5:
        h5["household/household_id"] = HOUSEHOLD_IDS
        h5["household/household_weight"] = np.array(DEFAULT_WEIGHTS, np.float32)
        h5["person/household_id"] = LINKS["person_household_id"]
        h5["person/age"] = PERSON_VARIABLES["age"]
    return path
