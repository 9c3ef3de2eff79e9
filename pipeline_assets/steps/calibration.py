"""The calibration package: a sparse matrix X (targets x household clones) and the target vector.

Each sampled household is cloned `clones` times and every clone is placed in a congressional
district (and a county within it), so that every district has records; X[t, j] is clone j's
contribution to target t when j lies inside the target's geography.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline_assets.steps import geography
from pipeline_assets.steps.config import CalibrationConfig
from pipeline_assets.steps.datasets import Dataset, load_dataset
from pipeline_assets.steps.h5io import open_for_write, read_frame, write_columns, write_frame
from pipeline_assets.steps.results import StepResult
from pipeline_assets.steps.uprating import check_period, cpi_u
from resources.files import atomic_path

LEVELS = ("national", "state", "district")


class UnknownTargetVariable(ValueError):
    """A target asks for a variable the dataset cannot supply."""


@dataclass(frozen=True)
class CalibrationPackage:
    matrix: sp.csr_matrix
    targets: pd.DataFrame  # name, geo_id, level, variable, stratum, value, group
    columns: pd.DataFrame  # household_index, clone, district, state_fips, county, base_weight

    def rows(self, levels: tuple[str, ...]) -> np.ndarray:
        return np.flatnonzero(self.targets["level"].isin(levels).to_numpy())


def parse_stratum(stratum: str) -> tuple[str, float, float] | None:
    """'age:0:5' -> ('age', 0, 5); 'all' -> None. Bounds are half-open [lo, hi)."""
    if stratum == "all":
        return None
    kind, lo, hi = stratum.split(":")
    return kind, float(lo), float(hi)


def _in_band(values: np.ndarray, stratum: str, kind: str) -> np.ndarray:
    parsed = parse_stratum(stratum)
    if parsed is None:
        return np.ones(len(values), dtype=bool)
    found, lo, hi = parsed
    if found != kind:
        raise UnknownTargetVariable(f"stratum {stratum!r} is not a {kind} band")
    return (values >= lo) & (values < hi)


def household_feature(data: Dataset, variable: str, stratum: str, dollars: float = 1.0) -> np.ndarray:
    """Per-household value of one target's (variable, stratum), aligned with data.households; amounts
    and AGI bands in the target's dollars (`dollars`: the dataset's period's dollar in the target's)."""
    n = len(data.households)
    index = pd.Index(data.households["household_id"])

    def per_household(frame: pd.DataFrame, values: np.ndarray) -> np.ndarray:
        rows = index.get_indexer(frame["household_id"])
        return np.bincount(rows, weights=values, minlength=n)

    units, persons = data.tax_units, data.persons
    agi = units["adjusted_gross_income"].to_numpy(float) * dollars
    if variable == "person_count":
        return per_household(persons, _in_band(persons["age"].to_numpy(float), stratum, "age").astype(float))
    if variable == "tax_unit_count":
        return per_household(units, _in_band(agi, stratum, "agi").astype(float))
    if variable == "adjusted_gross_income":
        return per_household(units, np.where(_in_band(agi, stratum, "agi"), agi, 0.0))
    if variable == "household_snap_count":
        return (data.households["snap"].to_numpy(float) > 0).astype(float)
    if variable == "eitc_returns":
        return per_household(units, (units["eitc"].to_numpy(float) > 0).astype(float))
    if variable == "eitc_amount":
        return per_household(units, units["eitc"].to_numpy(float) * dollars)
    raise UnknownTargetVariable(
        f"unknown target variable {variable!r}: expected one of person_count, tax_unit_count, "
        "adjusted_gross_income, household_snap_count, eitc_returns, eitc_amount"
    )


def read_targets(db_path: Path, variables: tuple[str, ...] | None) -> pd.DataFrame:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        targets = pd.read_sql_query(
            "SELECT g.level, t.geo_id, t.variable, t.stratum, t.value, t.source, t.period "
            "FROM targets t JOIN geographies g USING (geo_id) ORDER BY t.target_id",
            conn,
        )
    if variables is not None:
        missing = sorted(set(variables) - set(targets["variable"]))
        if missing:
            raise UnknownTargetVariable(f"target variables {missing} are not in the database {db_path}")
        targets = targets[targets["variable"].isin(variables)].reset_index(drop=True)
    targets["name"] = targets["geo_id"] + "/" + targets["variable"] + "/" + targets["stratum"]
    # Fit groups weigh equally: a level's totals count as much as all of that level's bands together.
    band_kind = targets["stratum"].str.split(":").str[0]
    group_keys = targets["level"] + "/" + targets["variable"] + "/" + band_kind
    targets["group"] = pd.factorize(group_keys)[0]
    return targets


def place_clones(n_households: int, config: CalibrationConfig, raw_dir: Path | None = None) -> pd.DataFrame:
    """Place every clone in a district: each district gets at least one record, the rest by population."""
    rng = np.random.default_rng(config.seed)
    populations = geography.district_populations(raw_dir)
    codes = [code for code, _state, _n in geography.districts(raw_dir)]
    n_columns = n_households * config.clones
    if n_columns < len(codes):
        raise ValueError(
            f"{n_households} households x {config.clones} clones = {n_columns} records cannot cover "
            f"{len(codes)} districts: raise households or clones"
        )
    pop = np.array([populations[c] for c in codes])
    share = pop / pop.sum() * (n_columns - len(codes))
    quota = 1 + np.floor(share).astype(int)
    remainder_order = np.argsort(-(share - np.floor(share)), kind="stable")
    quota[remainder_order[: n_columns - quota.sum()]] += 1
    district_of_column = rng.permutation(np.repeat(np.arange(len(codes)), quota))

    shares = geography.district_county_shares(raw_dir)
    counties = np.empty(n_columns, dtype=object)
    for d, code in enumerate(codes):
        cols = np.flatnonzero(district_of_column == d)
        names, probs = zip(*shares[code])
        counties[cols] = rng.choice(np.array(names, dtype=object), size=len(cols), p=np.array(probs))

    column = np.arange(n_columns)
    districts = np.array(codes, dtype=object)[district_of_column]
    return pd.DataFrame(
        {
            "household_index": column % n_households,
            "clone": column // n_households,
            "district": districts.astype(str),
            "state": [code.split("-")[0] for code in districts],
            "county": counties.astype(str),
        }
    )


def build_matrix(data: Dataset, targets: pd.DataFrame, columns: pd.DataFrame, raw_dir: Path | None = None) -> sp.csr_matrix:
    """Assemble X level by level: a clone counts toward the targets of the geographies containing it."""
    rows_out, cols_out, vals_out = [], [], []
    features = targets[["variable", "stratum", "period"]].drop_duplicates().reset_index(drop=True)
    feature_index = {key: k for k, key in enumerate(features.itertuples(index=False, name=None))}
    index = cpi_u(raw_dir)
    values = np.column_stack([
        household_feature(data, v, s, index[check_period(int(year), index)] / index[data.period])
        for v, s, year in features.itertuples(index=False, name=None)
    ]) if len(features) else np.zeros((len(data.households), 0))
    column_values = values[columns["household_index"].to_numpy()]
    col_idx, feat_idx = np.nonzero(column_values)
    entry_values = column_values[col_idx, feat_idx]

    for level in LEVELS:
        level_targets = targets[targets["level"] == level]
        if level_targets.empty:
            continue
        if level == "national":
            geo_codes, geo_ids = np.array(["US"]), np.zeros(len(columns), dtype=int)
        else:
            labels = columns["state" if level == "state" else "district"].to_numpy()
            geo_codes, geo_ids = np.unique(labels, return_inverse=True)
        geo_lookup = {code: g for g, code in enumerate(geo_codes)}
        row_of = np.full((len(features), len(geo_codes)), -1)
        for row, target in level_targets.iterrows():
            g = geo_lookup.get(target["geo_id"])
            if g is not None:
                row_of[feature_index[(target["variable"], target["stratum"], target["period"])], g] = row
        rows = row_of[feat_idx, geo_ids[col_idx]]
        keep = rows >= 0
        rows_out.append(rows[keep])
        cols_out.append(col_idx[keep])
        vals_out.append(entry_values[keep])

    rows = np.concatenate(rows_out) if rows_out else np.array([], dtype=int)
    return sp.csr_matrix(
        (np.concatenate(vals_out) if vals_out else np.array([]), (rows, np.concatenate(cols_out) if cols_out else rows)),
        shape=(len(targets), len(columns)),
    )


def build_calibration_package(
    db_path: Path, dataset_path: Path, out_path: Path, config: CalibrationConfig, raw_dir: Path | None = None
) -> StepResult:
    data = load_dataset(dataset_path)
    targets = read_targets(db_path, config.target_variables)
    columns = place_clones(len(data.households), config, raw_dir)
    columns["base_weight"] = data.households["weight"].to_numpy(float)[columns["household_index"]] / config.clones
    matrix = build_matrix(data, targets, columns, raw_dir)

    with atomic_path(out_path) as tmp, open_for_write(tmp) as h5:
        group = h5.create_group("matrix")
        write_columns(group, {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr})
        group.attrs["shape"] = matrix.shape
        write_frame(h5.create_group("targets"), targets)
        write_frame(h5.create_group("columns"), columns)

    covered = columns["district"].nunique()
    return StepResult(
        outputs={"package": out_path},
        figures={
            "targets": int(matrix.shape[0]),
            "columns": int(matrix.shape[1]),
            "nonzeros": int(matrix.nnz),
            "households": len(data.households),
            "clones": config.clones,
            "districts_covered": int(covered),
            "empty_target_rows": int((np.diff(matrix.indptr) == 0).sum()),
        },
    )


def load_calibration_package(path: Path, column_names: Iterable[str] | None = None) -> CalibrationPackage:
    """The package; of the clones' table only `column_names` where given (decoding the 200,000
    clones' geography strings takes longer than reading the whole matrix)."""
    with h5py.File(path, "r") as h5:
        group = h5["matrix"]
        matrix = sp.csr_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]), shape=tuple(group.attrs["shape"])
        )
        targets = read_frame(h5["targets"])
        columns = read_frame(h5["columns"], column_names)
    return CalibrationPackage(matrix=matrix, targets=targets, columns=columns)


def load_package_columns(path: Path) -> pd.DataFrame:
    """Only the clones' table (what the area files need), without reading the matrix."""
    with h5py.File(path, "r") as h5:
        return read_frame(h5["columns"])


# The columns of a fit's calibration log (written by the fit, read by the diagnostics and the UI).
LOG_COLUMNS = [
    "target", "estimate", "target_value", "error", "rel_error", "abs_error", "rel_abs_error", "epoch", "loss",
]


def relative_errors(estimate: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(estimate - target) / |target|, with |target| floored at 1 so zero targets stay finite."""
    return (estimate - target) / np.maximum(np.abs(target), 1.0)
