"""The PolicyEngine-US dataset layout without the model: the mapping table, the ids, and the checker
that every area file passes (tests/test_release.py runs it on a whole tiny release)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline_assets.steps.policyengine import (
    INPUTS,
    VARIABLES,
    filing_status,
    layout_problems,
    marital_units,
    person_inputs,
    write_dataset,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_documents_the_mapping_table_as_the_code_has_it():
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (.+?) \| (yes|) \|$", README.read_text(), flags=re.M)
    assert [(v, e, src, money == "yes") for v, e, src, money in rows] == [(i.variable, i.entity, i.source, i.money) for i in INPUTS]


def test_head_and_spouse_shares_and_unit_amounts_go_to_the_right_persons():
    units = pd.DataFrame({"tax_unit_id": [10, 11], "e00200p": [100.0, 7.0], "e00200s": [50.0, 0.0], "e00600": [30.0, 0.0],
                          "e00650": [20.0, 0.0], "blind_head": [0, 1], "blind_spouse": [1, 0]})
    for column in {c for i in INPUTS for c in (i.head, i.spouse, i.less) if c} - set(units):
        units[column] = 0.0
    persons = pd.DataFrame({"tax_unit_id": [10, 10, 10, 11], "role": ["head", "spouse", "dependent", "head"]})
    values = person_inputs(units, persons)
    assert list(values["employment_income_before_lsr"]) == [100.0, 50.0, 0.0, 7.0]
    assert list(values["qualified_dividend_income"]) == [20.0, 0.0, 0.0, 0.0]
    assert list(values["non_qualified_dividend_income"]) == [10.0, 0.0, 0.0, 0.0]
    assert list(values["is_blind"]) == [False, True, False, True]
    assert list(values["tax_unit_role_input"]) == [b"HEAD", b"SPOUSE", b"DEPENDENT", b"HEAD"]


def test_a_spouse_shares_the_heads_marital_unit_and_unknown_filing_statuses_are_refused():
    assert list(marital_units(np.array([b"HEAD", b"SPOUSE", b"DEPENDENT", b"HEAD", b"HEAD", b"SPOUSE"]))) == [0, 0, 1, 2, 3, 3]
    assert list(filing_status(np.array([1, 2, 3, 4]))) == [b"SINGLE", b"JOINT", b"SEPARATE", b"HEAD_OF_HOUSEHOLD"]
    with pytest.raises(ValueError, match=r"MARS values \[7\]: expected one of \[1, 2, 3, 4, 5\]"):
        filing_status(np.array([1, 7]))


def valid_variables() -> dict[str, np.ndarray]:
    """Two households: a couple with a child, and a single person."""
    person = {"person_id": [0, 1, 2, 3], "person_tax_unit_id": [0, 0, 0, 1], "person_household_id": [5, 5, 5, 9],
              "person_spm_unit_id": [5, 5, 5, 9], "person_family_id": [5, 5, 5, 9], "person_marital_unit_id": [0, 0, 1, 2]}
    groups = {"tax_unit_id": [0, 1], "household_id": [5, 9], "spm_unit_id": [5, 9], "family_id": [5, 9], "marital_unit_id": [0, 1, 2]}
    sizes = {"person": 4, "tax_unit": 2, "household": 2, "spm_unit": 2}
    inputs = {i.variable: np.zeros(sizes[i.entity], dtype=np.float64) for i in INPUTS}
    inputs["filing_status"] = np.array([b"JOINT", b"SINGLE"])
    return {**{k: np.array(v) for k, v in {**person, **groups}.items()}, **inputs}


def write(path: Path, variables: dict[str, np.ndarray], period: int = 2024) -> Path:
    with h5py.File(path, "w") as h5:
        write_dataset(h5, period, variables)
    return path


def test_a_file_in_the_layout_passes_and_each_kind_of_break_is_named(tmp_path):
    assert layout_problems(write(tmp_path / "ok.h5", valid_variables()), 2024) == []
    other_period = layout_problems(tmp_path / "ok.h5", 2023)
    assert len(other_period) == len(VARIABLES) and other_period[0] == "ok.h5: person_id has periods ['2024'], expected ['2023']"

    repeated = valid_variables() | {"person_id": np.array([0, 1, 1, 3])}
    assert layout_problems(write(tmp_path / "r.h5", repeated), 2024) == ["r.h5: person_id repeats"]
    unlinked = valid_variables() | {"person_household_id": np.array([5, 5, 5, 7])}
    assert layout_problems(write(tmp_path / "u.h5", unlinked), 2024) == ["u.h5: 1 persons link to no household"]
    short = valid_variables() | {"age": np.zeros(3)}
    assert layout_problems(write(tmp_path / "s.h5", short), 2024) == ["s.h5: age has 3 values, person has 4"]
    missing = {k: v for k, v in valid_variables().items() if k != "state_fips"} | {"weight": np.zeros(2)}
    assert layout_problems(write(tmp_path / "m.h5", missing), 2024) == [
        "m.h5: variables missing ['state_fips'], unexpected ['weight']"]
    with h5py.File(tmp_path / "w.h5", "w") as h5:  # float64 where the model keeps float32
        for name, values in valid_variables().items():
            h5.create_dataset(f"{name}/2024", data=values)
    assert "w.h5: age is float64, expected a 32-bit type" in layout_problems(tmp_path / "w.h5", 2024)
