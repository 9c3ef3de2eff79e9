"""The area files as PolicyEngine-US datasets, and the one table of what goes into them.

policyengine-core reads an H5 file whose top-level keys are variables, each a group holding one
array per period (its TIME_PERIOD_ARRAYS layout: /household_weight/2024). Every entity has an id
array and every person a link to each group entity (person_tax_unit_id, ...). The sample has no SPM
units or families of its own, so each household is one SPM unit and one family; a head and spouse
form one marital unit, everyone else their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd

from pipeline_assets.steps.h5io import write_columns

ENTITIES = ("person", "tax_unit", "spm_unit", "family", "marital_unit", "household")
GROUP_ENTITIES = ENTITIES[1:]
ID_VARIABLES = tuple(f"{entity}_id" for entity in ENTITIES)
LINK_VARIABLES = tuple(f"person_{entity}_id" for entity in GROUP_ENTITIES)
ROLE_INPUT = {"head": "HEAD", "spouse": "SPOUSE", "dependent": "DEPENDENT"}  # policyengine-us's TaxUnitRole
FILING_STATUS = {1: "SINGLE", 2: "JOINT", 3: "SEPARATE", 4: "HEAD_OF_HOUSEHOLD", 5: "SURVIVING_SPOUSE"}  # MARS


class Input(NamedTuple):
    """One PolicyEngine-US input variable of the area files and where its values come from.

    For a person's variable made from the CPS tax units, `head` is the tax unit's column the head's
    value comes from and `spouse` the spouse's where the CPS splits the amount (else the spouse and
    dependents get 0); `less` is a column subtracted from `head`'s (a total less its taxable part)."""

    variable: str
    entity: str
    source: str  # what the values are made from, for the README's table
    head: str | None = None
    spouse: str | None = None
    less: str | None = None
    money: bool = True  # uprated from the survey year to the release period (steps/uprating.py)
    flag: bool = False  # a yes/no the CPS codes as 0/1


INPUTS: tuple[Input, ...] = (
    Input("age", "person", "age_head, age_spouse; dependents' ages drawn within the CPS age bands", money=False),
    Input("tax_unit_role_input", "person", "head, spouse (joint filers) or dependent", money=False),
    Input("is_blind", "person", "blind_head, blind_spouse", "blind_head", "blind_spouse", money=False, flag=True),
    Input("employment_income_before_lsr", "person", "e00200p, e00200s (wages and salaries)", "e00200p", "e00200s"),
    Input("self_employment_income_before_lsr", "person", "e00900p, e00900s (business income)", "e00900p", "e00900s"),
    Input("farm_income", "person", "e02100p, e02100s", "e02100p", "e02100s"),
    Input("taxable_interest_income", "person", "e00300, to the head", "e00300"),
    Input("tax_exempt_interest_income", "person", "e00400, to the head", "e00400"),
    Input("qualified_dividend_income", "person", "e00650, to the head", "e00650"),
    Input("non_qualified_dividend_income", "person", "e00600 less e00650, to the head", "e00600", less="e00650"),
    Input("taxable_private_pension_income", "person", "e01700, to the head", "e01700"),
    Input("tax_exempt_private_pension_income", "person", "e01500 less e01700, to the head", "e01500", less="e01700"),
    Input("taxable_ira_distributions", "person", "e01400, to the head", "e01400"),
    Input("social_security_retirement", "person", "e02400 (all Social Security benefits; the CPS file does not "
                                                  "split them by program), to the head", "e02400"),
    Input("unemployment_compensation", "person", "e02300, to the head", "e02300"),
    Input("alimony_income", "person", "e00800, to the head", "e00800"),
    Input("non_sch_d_capital_gains", "person", "e01100 (capital gain distributions), to the head", "e01100"),
    Input("ssi_reported", "person", "ssi_ben, to the head", "ssi_ben"),
    Input("real_estate_taxes", "person", "e18500, to the head", "e18500"),
    Input("home_mortgage_interest", "person", "e19200 (interest paid), to the head", "e19200"),
    Input("charitable_cash_donations", "person", "e19800, to the head", "e19800"),
    Input("charitable_non_cash_donations", "person", "e20100, to the head", "e20100"),
    Input("student_loan_interest", "person", "e03210, to the head", "e03210"),
    Input("other_medical_expenses", "person", "e17500 (medical and dental expenses), to the head", "e17500"),
    Input("traditional_ira_contributions_desired", "person", "e03150, to the head", "e03150"),
    Input("self_employed_pension_contributions_desired", "person", "e03300, to the head", "e03300"),
    Input("filing_status", "tax_unit", "MARS (1 single, 2 joint, 3 separate, 4 head of household)", money=False),
    Input("spm_unit_pre_subsidy_childcare_expenses", "spm_unit", "e32800 (QRF-imputed), summed over the household's "
                                                                 "tax units"),
    Input("household_weight", "household", "the calibrated weight of the household clone (float32)", money=False),
    Input("state_fips", "household", "the clone's state", money=False),
    Input("county_fips", "household", "the clone's county, five-digit FIPS (Census 2020 codes)", money=False),
    Input("congressional_district_geoid", "household", "the clone's district as SSDD: state FIPS x 100 + district "
                                                       "number (at-large seats and DC are 01: AK 201, DC 1101)",
          money=False),
)
INPUTS_BY_ENTITY = {entity: tuple(i for i in INPUTS if i.entity == entity) for entity in ENTITIES}
# The CPS tax-unit columns the persons' values are made from, and those of them that are money.
PERSON_SOURCE_COLUMNS = tuple(dict.fromkeys(c for i in INPUTS_BY_ENTITY["person"] for c in (i.head, i.spouse, i.less) if c))
PERSON_MONEY_COLUMNS = tuple(dict.fromkeys(
    c for i in INPUTS_BY_ENTITY["person"] if i.money for c in (i.head, i.spouse, i.less) if c))
VARIABLES = (*ID_VARIABLES, *LINK_VARIABLES, *(i.variable for i in INPUTS))
ENTITY_OF = {**{v: v.removesuffix("_id") for v in ID_VARIABLES}, **{v: "person" for v in LINK_VARIABLES},
             **{i.variable: i.entity for i in INPUTS}}


def person_inputs(units: pd.DataFrame, persons: pd.DataFrame) -> dict[str, np.ndarray]:
    """The persons' input variables made from their tax unit's columns (aligned with `persons`)."""
    unit_row = pd.Index(units["tax_unit_id"]).get_indexer(persons["tax_unit_id"])
    role = persons["role"].to_numpy()
    out = {"tax_unit_role_input": np.array([ROLE_INPUT[r] for r in role], dtype="S")}
    for spec in INPUTS_BY_ENTITY["person"]:
        if spec.head is None:
            continue
        head = units[spec.head].to_numpy()[unit_row]
        if spec.less is not None:
            head = head - units[spec.less].to_numpy()[unit_row]
        spouse = units[spec.spouse].to_numpy()[unit_row] if spec.spouse else np.zeros_like(head)
        values = np.where(role == "head", head, np.where(role == "spouse", spouse, 0))
        out[spec.variable] = values.astype(bool) if spec.flag else values
    return out


def filing_status(mars: np.ndarray) -> np.ndarray:
    unknown = sorted(set(np.unique(mars).tolist()) - set(FILING_STATUS))
    if unknown:
        raise ValueError(f"MARS values {unknown}: expected one of {sorted(FILING_STATUS)}")
    return np.array([FILING_STATUS[m] for m in mars], dtype="S")


def marital_units(role: np.ndarray) -> np.ndarray:
    """0, 1, ... in person order: a spouse joins the head before them (persons come head, spouse,
    dependents within each tax unit), everyone else starts a unit of their own."""
    return np.cumsum(role != b"SPOUSE") - 1


def as_model_dtype(values: np.ndarray) -> np.ndarray:
    """The model's own dtypes: float32 for amounts and weights, int32 for ids and codes; bools and
    byte strings (enum names) as they are."""
    if values.dtype.kind == "f":
        return values.astype(np.float32)
    if values.dtype.kind in "iu":
        return values.astype(np.int32)
    return values


def write_dataset(h5: h5py.File, period: int, variables: dict[str, np.ndarray]) -> None:
    """Every variable as /variable/period, in the order given."""
    key = str(period)
    for name, values in variables.items():
        write_columns(h5.create_group(name), {key: as_model_dtype(np.asarray(values))})


def read_variable(h5: h5py.File, name: str) -> np.ndarray:
    """A variable's array in a file of one period."""
    group = h5[name]
    (period,) = group.keys()
    return group[period][()]


def layout_problems(path: Path, period: int) -> list[str]:
    """What keeps `path` from being a PolicyEngine-US dataset of `period` as the release writes it
    (nothing: it is one): the variables of the table and the ids, one array each for `period`,
    one length per entity, ids unique, every person linked to an existing unit of each entity."""
    problems = []
    with h5py.File(path, "r") as h5:
        names = set(h5.keys())
        missing, extra = sorted(set(VARIABLES) - names), sorted(names - set(VARIABLES))
        if missing or extra:
            return [f"{path.name}: variables missing {missing}, unexpected {extra}"]
        arrays = {}
        for name in VARIABLES:
            periods = list(h5[name].keys())
            if periods != [str(period)]:
                problems.append(f"{path.name}: {name} has periods {periods}, expected ['{period}']")
                continue
            arrays[name] = h5[name][str(period)][()]
    if problems:
        return problems
    lengths = {entity: len(arrays[f"{entity}_id"]) for entity in ENTITIES}
    for name, values in arrays.items():
        if len(values) != lengths[ENTITY_OF[name]]:
            problems.append(f"{path.name}: {name} has {len(values)} values, {ENTITY_OF[name]} has {lengths[ENTITY_OF[name]]}")
        if values.dtype.kind in "fi" and values.dtype.itemsize != 4:
            problems.append(f"{path.name}: {name} is {values.dtype}, expected a 32-bit type")
    for entity in ENTITIES:
        ids = arrays[f"{entity}_id"]
        if len(np.unique(ids)) != len(ids):
            problems.append(f"{path.name}: {entity}_id repeats")
    for entity in GROUP_ENTITIES:
        unlinked = ~np.isin(arrays[f"person_{entity}_id"], arrays[f"{entity}_id"])
        if unlinked.any():
            problems.append(f"{path.name}: {unlinked.sum()} persons link to no {entity}")
    return problems
