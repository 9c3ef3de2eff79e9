"""The targets database: the packaged raw public statistics, loaded into one SQLite file.

The file is built under a temporary name, validated, and only then renamed into place, so a reader
never sees a database that failed its checks. Tables hold no timestamps: the same raw inputs give the
same rows in the same order.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from resources.files import atomic_path, sha256_file

from .config import DatabaseConfig
from .geography import (
    COUNTY_SHARES,
    DISTRICT_LIST,
    DISTRICT_POPULATIONS,
    STATE_ABBREV_BY_FIPS,
    STATES,
    district_code,
    district_county_shares,
    districts,
    raw_input,
)
from .results import StepResult

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE raw_inputs (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL);
CREATE TABLE geographies (
    geo_id TEXT PRIMARY KEY,
    level TEXT NOT NULL CHECK (level IN ('national','state','district')),
    name TEXT NOT NULL,
    state_fips TEXT,
    parent_geo_id TEXT
);
CREATE TABLE district_counties (
    district_id TEXT NOT NULL REFERENCES geographies(geo_id),
    county_name TEXT NOT NULL,
    population_share REAL NOT NULL,
    PRIMARY KEY (district_id, county_name)
);
CREATE TABLE targets (
    target_id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    period INTEGER NOT NULL,
    geo_id TEXT NOT NULL REFERENCES geographies(geo_id),
    variable TEXT NOT NULL,
    stratum TEXT NOT NULL,
    value REAL NOT NULL,
    UNIQUE (source, period, geo_id, variable, stratum)
);
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

STRATUM_FORMAT = "all | KIND:LO:HI, half-open [LO, HI), -inf/inf for open ends"

ACS_AGE_STATE = "acs_S0101_state_2024.json"
ACS_AGE_DISTRICT = DISTRICT_POPULATIONS
ACS_SNAP_DISTRICT = "acs_S2201_district_2024.json.gz"
SOI_AGI_STATE = "agi_state.csv"
SOI_NATIONAL = "soi_targets.csv.gz"
SNAP_STATE = "snap_state.csv"
EITC_STATE = "eitc_state.csv"
# Every raw file the database is made from (the step's declaration, see the step specs, stages.STEPS); each
# is recorded (sha256, size) in raw_inputs.
RAW_INPUT_FILES = (
    DISTRICT_LIST, COUNTY_SHARES, ACS_AGE_STATE, ACS_AGE_DISTRICT, ACS_SNAP_DISTRICT,
    SOI_AGI_STATE, SOI_NATIONAL, SNAP_STATE, EITC_STATE,
)

ACS_PERIOD = 2024
SOI_STATE_PERIOD = 2022
SNAP_STATE_PERIOD = 2023
EITC_PERIOD = 2022

NATIONAL_GEO_ID = "US"
STATE_GEO_PREFIX = "0400000US"
DISTRICT_GEO_PREFIX = "5001900US"
PUERTO_RICO_FIPS = "72"  # in the ACS files, outside the release

# S0101_C01_001E is the total; _002E.._019E are the five-year bands under 5, ..., 80-84, 85+.
AGE_TOTAL_COLUMN = "S0101_C01_001E"
AGE_BAND_COLUMNS = tuple(
    (f"S0101_C01_{index:03d}E", 5 * (index - 2), 5 * (index - 1) if index < 19 else math.inf)
    for index in range(2, 20)
)
PERSON_COUNT_STRATA = 1 + len(AGE_BAND_COLUMNS)
SNAP_HOUSEHOLDS = "S2201_C03_001E"  # households receiving SNAP

SOI_STATE_VARIABLES = {
    ("adjusted_gross_income/count", "1"): "tax_unit_count",
    ("adjusted_gross_income/amount", "0"): "adjusted_gross_income",
}
AGI_VARIABLES = ("tax_unit_count", "adjusted_gross_income")

EXPECTED_STATES = len(STATES)
EXPECTED_DISTRICTS = 436
# Published totals equal the sum of their published strata up to rounding: exactly in the ACS,
# within a few returns of 161 million in the SOI tables.
STRATA_SUM_TOLERANCE = 1e-6
COUNTY_SHARE_TOLERANCE = 1e-6
# AGI per return far outside this range means the amounts are not in dollars (thousands, say).
PLAUSIBLE_AGI_PER_RETURN = (10_000.0, 1_000_000.0)


class DatabaseValidationError(ValueError):
    """The built database violates a validation check; the message names the check and the numbers."""


class Target(NamedTuple):
    source: str
    period: int
    geo_id: str
    variable: str
    stratum: str
    value: float


def build_database(out_path: Path, config: DatabaseConfig, raw_dir: Path | None = None) -> StepResult:
    """Build, validate and atomically publish the targets database at out_path."""
    out_path = Path(out_path)
    raw_rows = [_raw_input_row(name, raw_dir) for name in RAW_INPUT_FILES]  # a missing one fails here
    with atomic_path(out_path) as tmp, contextlib.closing(sqlite3.connect(tmp)) as conn:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO raw_inputs VALUES (?, ?, ?)", raw_rows)
        conn.executemany("INSERT INTO geographies VALUES (?, ?, ?, ?, ?)", _geographies(raw_dir))
        conn.executemany("INSERT INTO district_counties VALUES (?, ?, ?)", _district_counties(raw_dir))
        conn.executemany(
            "INSERT INTO targets (source, period, geo_id, variable, stratum, value)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            _all_targets(config, raw_dir),
        )
        conn.executemany(
            "INSERT INTO metadata VALUES (?, ?)",
            [
                ("schema_version", SCHEMA_VERSION),
                ("soi_national_year", str(config.soi_national_year)),
                ("stratum_format", STRATUM_FORMAT),
            ],
        )
        conn.commit()
        figures = {**_counts(conn), **validate_database(conn, config)}
    return StepResult(outputs={"database": out_path}, figures=figures)


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    figures = {"targets": conn.execute("SELECT COUNT(*) FROM targets").fetchone()[0]}
    for source, count in conn.execute("SELECT source, COUNT(*) FROM targets GROUP BY source ORDER BY 1"):
        figures[f"targets_{source}"] = count
    levels = dict(conn.execute("SELECT level, COUNT(*) FROM geographies GROUP BY level"))
    figures["n_geographies"] = sum(levels.values())
    figures["n_states"] = levels.get("state", 0)
    figures["n_districts"] = levels.get("district", 0)
    return figures


# --- raw inputs -------------------------------------------------------------------------------


def _raw_input_row(name: str, raw_dir: Path | None) -> tuple[str, str, int]:
    path = raw_input(name, raw_dir)
    return name, sha256_file(path), path.stat().st_size


def _read_text(name: str, raw_dir: Path | None) -> str:
    path = raw_input(name, raw_dir)
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")


def _census_table(name: str, raw_dir: Path | None) -> list[dict[str, str]]:
    """Census API JSON (a header row, then one row per area) as one dict per area."""
    header, *rows = json.loads(_read_text(name, raw_dir))
    return [dict(zip(header, row)) for row in rows]


def _csv_rows(name: str, raw_dir: Path | None) -> list[dict[str, str]]:
    """CSV rows as dicts; leading '#' lines are provenance notes, not data."""
    lines = [line for line in _read_text(name, raw_dir).splitlines() if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def _state_fips(census_geo_id: str) -> str:
    if not census_geo_id.startswith(STATE_GEO_PREFIX):
        raise ValueError(f"not a state GEO_ID: {census_geo_id!r}")
    return census_geo_id.removeprefix(STATE_GEO_PREFIX)


def _census_states(name: str, raw_dir: Path | None) -> list[tuple[str, dict[str, str]]]:
    """(postal abbreviation, row) per state of a Census API table, Puerto Rico dropped."""
    return [
        (STATE_ABBREV_BY_FIPS[fips], row)
        for row in _census_table(name, raw_dir)
        if (fips := _state_fips(row["GEO_ID"])) != PUERTO_RICO_FIPS
    ]


def _census_districts(name: str, raw_dir: Path | None) -> list[tuple[str, dict[str, str]]]:
    """(district code, row) per congressional district of a Census API table, Puerto Rico dropped."""
    out = []
    for row in _census_table(name, raw_dir):
        if not row["GEO_ID"].startswith(DISTRICT_GEO_PREFIX):
            raise ValueError(f"{name}: not a congressional district GEO_ID: {row['GEO_ID']!r}")
        fips_and_number = row["GEO_ID"].removeprefix(DISTRICT_GEO_PREFIX)
        fips, number = fips_and_number[:2], fips_and_number[2:]
        if fips != PUERTO_RICO_FIPS:
            out.append((district_code(fips, number), row))
    return out


# --- geographies ------------------------------------------------------------------------------


def _geographies(raw_dir: Path | None) -> list[tuple[str, str, str, str | None, str | None]]:
    """The nation, the 51 states and the 436 districts, named as the Census names them."""
    district_names = {
        district_code(state, number): name
        for name, state, number in json.loads(_read_text(DISTRICT_LIST, raw_dir))[1:]
        if state in STATE_ABBREV_BY_FIPS and number.isdigit()
    }
    rows = [(NATIONAL_GEO_ID, "national", "United States", None, None)]
    rows += [(abbrev, "state", name, fips, NATIONAL_GEO_ID) for fips, abbrev, name in STATES]
    rows += [
        (code, "district", district_names[code], state, STATE_ABBREV_BY_FIPS[state])
        for code, state, _number in districts(raw_dir)
    ]
    return rows


def _district_counties(raw_dir: Path | None) -> list[tuple[str, str, float]]:
    shares = district_county_shares(raw_dir)
    return [
        (code, county, share)
        for code, _state, _number in districts(raw_dir)
        for county, share in shares.get(code, ())
    ]


# --- targets ----------------------------------------------------------------------------------


def stratum(kind: str, lower: float, upper: float) -> str:
    """'age:0:5', 'agi:-inf:1': half-open [lower, upper), integral bounds written as ints."""
    return f"{kind}:{_bound(lower)}:{_bound(upper)}"


def _bound(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _all_targets(config: DatabaseConfig, raw_dir: Path | None) -> list[Target]:
    return [
        *_person_count_targets(raw_dir),
        *_state_agi_targets(raw_dir),
        *_national_agi_targets(config.soi_national_year, raw_dir),
        *_snap_targets(raw_dir),
        *_eitc_targets(raw_dir),
    ]


def _national_sums(state_targets: list[Target]) -> list[Target]:
    """National rows of a state-only source: the sum of the 51 states, per variable and stratum."""
    sums: dict[tuple[str, int, str, str], float] = defaultdict(float)
    for target in state_targets:
        sums[target.source, target.period, target.variable, target.stratum] += target.value
    return [
        Target(source, period, NATIONAL_GEO_ID, variable, stratum_, value)
        for (source, period, variable, stratum_), value in sums.items()
    ]


def _age_targets(geo_id: str, row: dict[str, str]) -> list[Target]:
    def target(stratum_: str, column: str) -> Target:
        return Target("census_acs_s0101", ACS_PERIOD, geo_id, "person_count", stratum_, float(row[column]))

    return [target("all", AGE_TOTAL_COLUMN)] + [
        target(stratum("age", lower, upper), column) for column, lower, upper in AGE_BAND_COLUMNS
    ]


def _person_count_targets(raw_dir: Path | None) -> list[Target]:
    states = [
        target
        for abbrev, row in _census_states(ACS_AGE_STATE, raw_dir)
        for target in _age_targets(abbrev, row)
    ]
    district_targets = [
        target
        for code, row in _census_districts(ACS_AGE_DISTRICT, raw_dir)
        for target in _age_targets(code, row)
    ]
    return _national_sums(states) + states + district_targets


def population_targets(raw_dir: Path | None = None) -> dict[str, float]:
    """geo_id -> the total population target (ACS S0101, all ages) the calibration gets for it."""
    return {target.geo_id: target.value for target in _person_count_targets(raw_dir) if target.stratum == "all"}


def _state_agi_targets(raw_dir: Path | None) -> list[Target]:
    """IRS SOI returns and AGI by bracket per state; the amounts are already in dollars."""
    targets = []
    for row in _csv_rows(SOI_AGI_STATE, raw_dir):
        key = (row["VARIABLE"], row["IS_COUNT"])
        if key not in SOI_STATE_VARIABLES:
            raise ValueError(f"{SOI_AGI_STATE}: unexpected VARIABLE, IS_COUNT {key}")
        variable = SOI_STATE_VARIABLES[key]
        bracket = stratum("agi", float(row["AGI_LOWER_BOUND"]), float(row["AGI_UPPER_BOUND"]))
        abbrev = STATE_ABBREV_BY_FIPS[_state_fips(row["GEO_ID"])]
        targets.append(Target("irs_soi", SOI_STATE_PERIOD, abbrev, variable, bracket, float(row["VALUE"])))
    return targets


def _national_agi_targets(year: int, raw_dir: Path | None) -> list[Target]:
    """IRS SOI Table 1.1, all filers: returns and AGI (dollars) by bracket, and the full-population total."""
    wanted = {
        ("count", "True"): "tax_unit_count",
        ("adjusted_gross_income", "False"): "adjusted_gross_income",
    }
    targets = []
    for row in _csv_rows(SOI_NATIONAL, raw_dir):
        variable = wanted.get((row["Variable"], row["Count"]))
        if variable is None or int(row["Year"]) != year:
            continue
        if row["Filing status"] != "All" or row["Taxable only"] != "False":
            continue
        if row["Full population"] == "True":
            bracket = "all"
        else:
            lower, upper = float(row["AGI lower bound"]), float(row["AGI upper bound"])
            # SOI's "no adjusted gross income" row is AGI below $1 (the next row starts at $1); its
            # upper bound is written 0, which as a half-open bound would put AGI of 0 in no bracket.
            if lower == -math.inf and upper == 0:
                upper = 1.0
            bracket = stratum("agi", lower, upper)
        value = float(row["Value"])
        targets.append(Target("irs_soi_national", year, NATIONAL_GEO_ID, variable, bracket, value))
    if not targets:
        raise ValueError(f"{SOI_NATIONAL}: no returns or AGI rows for year {year}")
    return targets


def _state_csv_targets(
    name: str, source: str, period: int, columns: dict[str, str], raw_dir: Path | None
) -> list[Target]:
    """One stratum-`all` target per state and column of a GEO_ID-keyed state table."""
    targets = []
    for row in _csv_rows(name, raw_dir):
        abbrev = STATE_ABBREV_BY_FIPS[_state_fips(row["GEO_ID"])]
        for column, variable in columns.items():
            targets.append(Target(source, period, abbrev, variable, "all", float(row[column])))
    return targets


def _snap_targets(raw_dir: Path | None) -> list[Target]:
    """SNAP households: administrative counts per state (USDA FNS), survey counts per district (ACS)."""
    states = _state_csv_targets(
        SNAP_STATE, "usda_fns", SNAP_STATE_PERIOD, {"Households": "household_snap_count"}, raw_dir
    )
    district_targets = [
        Target("census_acs_s2201", ACS_PERIOD, code, "household_snap_count", "all", float(row[SNAP_HOUSEHOLDS]))
        for code, row in _census_districts(ACS_SNAP_DISTRICT, raw_dir)
    ]
    return _national_sums(states) + states + district_targets


def _eitc_targets(raw_dir: Path | None) -> list[Target]:
    columns = {"Returns": "eitc_returns", "Amount": "eitc_amount"}  # Amount already converted to dollars
    states = _state_csv_targets(EITC_STATE, "irs_soi_table2", EITC_PERIOD, columns, raw_dir)
    return _national_sums(states) + states


# --- validation -------------------------------------------------------------------------------


def validate_database(conn: sqlite3.Connection, config: DatabaseConfig) -> dict[str, float]:
    """Raise DatabaseValidationError on the first violated check; return the figures measured on the way."""
    _check_geographies(conn)
    _check_target_geographies(conn)
    _check_values(conn)
    _check_person_count_rows(conn)
    _check_strata_sum_to_totals(conn)
    _check_state_agi_brackets(conn)
    _check_agi_in_dollars(conn)
    _check_county_shares(conn)
    return {
        "max_district_state_rel_diff": _check_districts_sum_to_states(conn, config.district_state_tolerance),
        **_snap_district_state_ratios(conn),
    }


def _fail(check: str, detail: str) -> DatabaseValidationError:
    return DatabaseValidationError(f"{check}: {detail}")


def _rel_diff(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return abs(value - reference) / abs(reference)


def _check_geographies(conn: sqlite3.Connection) -> None:
    levels = dict(conn.execute("SELECT level, COUNT(*) FROM geographies GROUP BY level"))
    expected = {"national": 1, "state": EXPECTED_STATES, "district": EXPECTED_DISTRICTS}
    if {level: levels.get(level, 0) for level in expected} != expected:
        raise _fail("geographies", f"found {levels}, expected {expected}")


def _check_target_geographies(conn: sqlite3.Connection) -> None:
    unknown = conn.execute(
        "SELECT geo_id, COUNT(*) FROM targets WHERE geo_id NOT IN (SELECT geo_id FROM geographies)"
        " GROUP BY geo_id ORDER BY geo_id"
    ).fetchall()
    if unknown:
        geo_id, rows = unknown[0]
        raise _fail("target geographies", f"{len(unknown)} unknown geo_ids, first {geo_id} ({rows} rows)")


def _check_values(conn: sqlite3.Connection) -> None:
    """Every value finite and non-negative; AGI in the open-ended lowest bracket may be negative."""
    rows = conn.execute(
        "SELECT source, period, geo_id, variable, stratum, value FROM targets ORDER BY target_id"
    )
    bad = [
        (source, period, geo_id, variable, stratum_, value)
        for source, period, geo_id, variable, stratum_, value in rows
        if not math.isfinite(value)
        or (value < 0 and not (variable == "adjusted_gross_income" and stratum_.startswith("agi:-inf:")))
    ]
    if bad:
        first = " ".join(str(field) for field in bad[0][:5])
        raise _fail("target values", f"{len(bad)} negative or non-finite, first {first} = {bad[0][5]}")


def _check_person_count_rows(conn: sqlite3.Connection) -> None:
    counts = dict(
        conn.execute(
            "SELECT geo_id, COUNT(*) FROM targets"
            " WHERE source = 'census_acs_s0101' AND variable = 'person_count' GROUP BY geo_id"
        )
    )
    wrong = [
        (geo_id, counts.get(geo_id, 0))
        for (geo_id,) in conn.execute("SELECT geo_id FROM geographies ORDER BY geo_id")
        if counts.get(geo_id, 0) != PERSON_COUNT_STRATA
    ]
    if wrong:
        geo_id, count = wrong[0]
        raise _fail(
            "person_count rows",
            f"{len(wrong)} geographies without {PERSON_COUNT_STRATA} rows, first {geo_id} has {count}",
        )


def _check_strata_sum_to_totals(conn: sqlite3.Connection) -> None:
    """Where a total (stratum `all`) is published with strata of one kind, the strata sum to it."""
    totals: dict[tuple, float] = {}
    stratum_sums: dict[tuple, float] = defaultdict(float)
    for source, period, geo_id, variable, stratum_, value in conn.execute(
        "SELECT source, period, geo_id, variable, stratum, value FROM targets ORDER BY target_id"
    ):
        key = (source, period, geo_id, variable)
        if stratum_ == "all":
            totals[key] = value
        else:
            stratum_sums[key + (stratum_.split(":")[0],)] += value
    for (*key, kind), summed in stratum_sums.items():
        total = totals.get(tuple(key))
        if total is not None and _rel_diff(summed, total) > STRATA_SUM_TOLERANCE:
            source, period, geo_id, variable = key
            raise _fail(
                "strata sum to total",
                f"{geo_id} {source} {period} {variable}: {kind} strata sum to {summed:.0f},"
                f" total is {total:.0f}"
                f" (rel diff {_rel_diff(summed, total):.6f} > {STRATA_SUM_TOLERANCE})",
            )


def _check_state_agi_brackets(conn: sqlite3.Connection) -> None:
    """Every state has one and the same set of AGI brackets, for returns and for AGI."""
    brackets: dict[tuple[str, str], set[str]] = defaultdict(set)
    for geo_id, variable, stratum_ in conn.execute(
        "SELECT geo_id, variable, stratum FROM targets WHERE source = 'irs_soi'"
    ):
        brackets[geo_id, variable].add(stratum_)
    states = [row[0] for row in conn.execute("SELECT geo_id FROM geographies WHERE level = 'state' ORDER BY 1")]
    reference = brackets.get((states[0], AGI_VARIABLES[0]), set())
    if not reference:
        raise _fail("state AGI brackets", f"{states[0]} has no {AGI_VARIABLES[0]} brackets")
    for state in states:
        for variable in AGI_VARIABLES:
            found = brackets.get((state, variable), set())
            if found != reference:
                raise _fail(
                    "state AGI brackets",
                    f"{state} {variable} has {len(found)} brackets, {states[0]} {AGI_VARIABLES[0]} has"
                    f" {len(reference)} (missing {sorted(reference - found)},"
                    f" extra {sorted(found - reference)})",
                )


def _check_agi_in_dollars(conn: sqlite3.Connection) -> None:
    low, high = PLAUSIBLE_AGI_PER_RETURN
    for source, geo_id, returns, agi in conn.execute(
        "SELECT source, geo_id,"
        " SUM(CASE WHEN variable = 'tax_unit_count' THEN value END),"
        " SUM(CASE WHEN variable = 'adjusted_gross_income' THEN value END)"
        " FROM targets WHERE source IN ('irs_soi', 'irs_soi_national') AND stratum != 'all'"
        " GROUP BY source, geo_id ORDER BY source, geo_id"
    ):
        per_return = (agi or 0.0) / returns if returns else math.nan
        if not low <= per_return <= high:
            raise _fail(
                "AGI units",
                f"{source} {geo_id} AGI per return {per_return:,.0f} outside [{low:,.0f}, {high:,.0f}]:"
                " amounts not in dollars?",
            )


def _check_county_shares(conn: sqlite3.Connection) -> None:
    for geo_id, total in conn.execute(
        "SELECT g.geo_id, COALESCE(SUM(c.population_share), 0) FROM geographies g"
        " LEFT JOIN district_counties c ON c.district_id = g.geo_id"
        " WHERE g.level = 'district' GROUP BY g.geo_id ORDER BY g.geo_id"
    ):
        if abs(total - 1) > COUNTY_SHARE_TOLERANCE:
            raise _fail(
                "county shares", f"{geo_id} shares sum to {total:.9f}, not 1 within {COUNTY_SHARE_TOLERANCE}"
            )


def _district_and_state_sums(
    conn: sqlite3.Connection, district_source: str, state_source: str, variable: str
) -> list[tuple[str, str, float, float]]:
    """(state, stratum, sum over the state's districts, state value) for one variable."""
    state_of = dict(conn.execute("SELECT geo_id, parent_geo_id FROM geographies WHERE level = 'district'"))
    district_sums: dict[tuple[str, str], float] = defaultdict(float)
    for geo_id, stratum_, value in conn.execute(
        "SELECT geo_id, stratum, value FROM targets WHERE source = ? AND variable = ? ORDER BY target_id",
        (district_source, variable),
    ):
        if geo_id in state_of:
            district_sums[state_of[geo_id], stratum_] += value
    return [
        (state, stratum_, district_sums[state, stratum_], value)
        for state, stratum_, value in conn.execute(
            "SELECT geo_id, stratum, value FROM targets WHERE source = ? AND variable = ?"
            " AND geo_id IN (SELECT geo_id FROM geographies WHERE level = 'state') ORDER BY target_id",
            (state_source, variable),
        )
    ]


def _check_districts_sum_to_states(conn: sqlite3.Connection, tolerance: float) -> float:
    """Districts' person counts (total and each band) sum to their state's; returns the largest rel diff."""
    rows = _district_and_state_sums(conn, "census_acs_s0101", "census_acs_s0101", "person_count")
    worst = max(rows, key=lambda row: _rel_diff(row[2], row[3]))
    state, stratum_, district_sum, state_value = worst
    max_rel_diff = _rel_diff(district_sum, state_value)
    if max_rel_diff > tolerance:
        raise _fail(
            "districts sum to state",
            f"{state} person_count {stratum_}: districts sum to {district_sum:.0f}, state is {state_value:.0f}"
            f" (rel diff {max_rel_diff:.6f} > tolerance {tolerance})",
        )
    return max_rel_diff


def _snap_district_state_ratios(conn: sqlite3.Connection) -> dict[str, float]:
    """ACS district SNAP households over FNS state households: different sources, so recorded, not enforced."""
    ratios = [
        district_sum / state_value
        for _state, _stratum, district_sum, state_value in _district_and_state_sums(
            conn, "census_acs_s2201", "usda_fns", "household_snap_count"
        )
    ]
    return {"snap_district_state_ratio_min": min(ratios), "snap_district_state_ratio_max": max(ratios)}
