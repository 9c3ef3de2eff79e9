"""The targets database step: what it loads, what its validation refuses, and that it publishes atomically."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from pipeline_assets.steps.config import DatabaseConfig
from pipeline_assets.steps.database import (
    RAW_INPUT_FILES,
    DatabaseValidationError,
    build_database,
    validate_database,
)
from pipeline_assets.steps.geography import RawInputMissing, raw_inputs_dir
from resources.files import sha256_file

CONFIG = DatabaseConfig()
AGE_STRATA = {"all", *(f"age:{lo}:{lo + 5}" for lo in range(0, 85, 5)), "age:85:inf"}
GEOGRAPHIES = 1 + 51 + 436


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("db") / "policy_data.db"
    return out, build_database(out, CONFIG)


@pytest.fixture(scope="module")
def db(built):
    conn = sqlite3.connect(f"file:{built[0]}?mode=ro", uri=True)
    yield conn
    conn.close()


def count(conn, where: str = "1", *params) -> int:
    return conn.execute(f"SELECT COUNT(*) FROM targets WHERE {where}", params).fetchone()[0]


def distinct_strata(conn, source: str, variable: str) -> set[str]:
    rows = conn.execute(
        "SELECT DISTINCT stratum FROM targets WHERE source = ? AND variable = ?", (source, variable)
    )
    return {stratum for (stratum,) in rows}


def copy_raw_inputs(dest: Path) -> Path:
    """A raw-input directory holding only the files the database reads (skips the large microdata)."""
    dest.mkdir()
    for name in RAW_INPUT_FILES:
        shutil.copy(raw_inputs_dir() / name, dest / name)
    return dest


def tampered_copy(built, tmp_path, *statements: str) -> sqlite3.Connection:
    copy = tmp_path / "tampered.db"
    shutil.copy(built[0], copy)
    conn = sqlite3.connect(copy)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    return conn


def test_schema_tables_and_columns(db):
    columns = {
        table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    }
    assert columns == {
        "district_counties": ["district_id", "county_name", "population_share"],
        "geographies": ["geo_id", "level", "name", "state_fips", "parent_geo_id"],
        "metadata": ["key", "value"],
        "raw_inputs": ["name", "sha256", "size_bytes"],
        "targets": ["target_id", "source", "period", "geo_id", "variable", "stratum", "value"],
    }
    metadata = dict(db.execute("SELECT key, value FROM metadata"))
    assert metadata["schema_version"] == "1"
    assert metadata["soi_national_year"] == str(CONFIG.soi_national_year)


def test_geographies(db):
    levels = dict(db.execute("SELECT level, COUNT(*) FROM geographies GROUP BY level"))
    assert levels == {"national": 1, "state": 51, "district": 436}
    rows = {row[0]: row[1:] for row in db.execute("SELECT * FROM geographies")}
    assert rows["US"] == ("national", "United States", None, None)
    assert rows["AL"] == ("state", "Alabama", "01", "US")
    assert rows["AL-01"][0] == "district" and rows["AL-01"][2:] == ("01", "AL")
    assert rows["DC-01"][2:] == ("11", "DC") and rows["AK-01"][2:] == ("02", "AK")
    assert "PR" not in rows and not any(geo_id.startswith("PR-") for geo_id in rows)


def test_person_count_by_age(db):
    assert count(db, "source = 'census_acs_s0101'") == GEOGRAPHIES * 19
    assert distinct_strata(db, "census_acs_s0101", "person_count") == AGE_STRATA
    per_geo = db.execute(
        "SELECT COUNT(*) FROM targets WHERE source = 'census_acs_s0101' GROUP BY geo_id"
    ).fetchall()
    assert len(per_geo) == GEOGRAPHIES and {n for (n,) in per_geo} == {19}
    us, states = db.execute(
        "SELECT SUM(CASE WHEN geo_id = 'US' THEN value END),"
        " SUM(CASE WHEN geo_id IN (SELECT geo_id FROM geographies WHERE level = 'state') THEN value END)"
        " FROM targets WHERE source = 'census_acs_s0101' AND stratum = 'all'"
    ).fetchone()
    assert us == states and 330e6 < us < 345e6


def test_state_agi_brackets(db):
    brackets = distinct_strata(db, "irs_soi", "tax_unit_count")
    assert brackets == distinct_strata(db, "irs_soi", "adjusted_gross_income")
    assert {"agi:-inf:1", "agi:1:10000", "agi:1000000:inf"} <= brackets
    assert count(db, "source = 'irs_soi'") == 51 * len(brackets) * 2
    assert count(db, "source = 'irs_soi' AND period = 2022") == count(db, "source = 'irs_soi'")
    # Dollars, not thousands: Alabama's 2022 AGI is about $160 billion.
    (al_agi,) = db.execute(
        "SELECT SUM(value) FROM targets"
        " WHERE source = 'irs_soi' AND geo_id = 'AL' AND variable = 'adjusted_gross_income'"
    ).fetchone()
    assert 100e9 < al_agi < 300e9


def test_national_agi(db):
    counts = distinct_strata(db, "irs_soi_national", "tax_unit_count")
    assert counts == distinct_strata(db, "irs_soi_national", "adjusted_gross_income")
    assert {"all", "agi:-inf:1", "agi:1:5000", "agi:10000000:inf"} <= counts
    assert count(db, "source = 'irs_soi_national'") == 2 * len(counts)
    year = CONFIG.soi_national_year
    assert count(db, "source = 'irs_soi_national' AND (geo_id != 'US' OR period != ?)", year) == 0
    returns, agi = (
        db.execute(
            "SELECT value FROM targets"
            " WHERE source = 'irs_soi_national' AND variable = ? AND stratum = 'all'",
            (variable,),
        ).fetchone()[0]
        for variable in ("tax_unit_count", "adjusted_gross_income")
    )
    assert 150e6 < returns < 170e6 and 13e12 < agi < 17e12


def test_snap_and_eitc(db):
    snap = "variable = 'household_snap_count' AND stratum = 'all'"
    assert count(db, f"source = 'usda_fns' AND {snap}") == 52
    assert count(db, f"source = 'census_acs_s2201' AND {snap}") == 436
    assert count(db, "source = 'irs_soi_table2'") == 52 * 2
    for source, variable in [("usda_fns", "household_snap_count"), ("irs_soi_table2", "eitc_amount")]:
        us, states = db.execute(
            "SELECT SUM(CASE WHEN geo_id = 'US' THEN value END), SUM(CASE WHEN geo_id != 'US' THEN value END)"
            " FROM targets WHERE source = ? AND variable = ?",
            (source, variable),
        ).fetchone()
        assert us == pytest.approx(states, rel=1e-12)


def test_figures(built, db):
    _, result = built
    figures = result.figures
    assert result.outputs == {"database": built[0]}
    assert figures["targets"] == count(db)
    for (source,) in db.execute("SELECT DISTINCT source FROM targets"):
        assert figures[f"targets_{source}"] == count(db, "source = ?", source)
    assert (figures["n_geographies"], figures["n_states"], figures["n_districts"]) == (GEOGRAPHIES, 51, 436)
    assert 0 < figures["snap_district_state_ratio_min"] <= figures["snap_district_state_ratio_max"]
    assert all(isinstance(value, (int, float)) for value in figures.values())


def test_districts_sum_to_states(built, db):
    parent = dict(db.execute("SELECT geo_id, parent_geo_id FROM geographies WHERE level = 'district'"))
    value = {
        (geo_id, stratum): v
        for geo_id, stratum, v in db.execute(
            "SELECT geo_id, stratum, value FROM targets WHERE source = 'census_acs_s0101'"
        )
    }
    district_sums = {}
    for (geo_id, stratum), v in value.items():
        if geo_id in parent:
            district_sums[parent[geo_id], stratum] = district_sums.get((parent[geo_id], stratum), 0.0) + v
    assert len(district_sums) == 51 * 19
    rel_diffs = [abs(total - value[key]) / value[key] for key, total in district_sums.items()]
    assert max(rel_diffs) <= CONFIG.district_state_tolerance
    assert built[1].figures["max_district_state_rel_diff"] == pytest.approx(max(rel_diffs), abs=1e-12)


def test_county_shares_sum_to_one(db):
    sums = dict(
        db.execute("SELECT district_id, SUM(population_share) FROM district_counties GROUP BY district_id")
    )
    assert len(sums) == 436
    assert all(abs(total - 1) <= 1e-6 for total in sums.values())


def test_raw_inputs_match_packaged_checksums(db):
    packaged = dict(
        reversed(line.split()) for line in (raw_inputs_dir() / "SHA256SUMS").read_text().splitlines() if line
    )
    recorded = {name: (sha256, size) for name, sha256, size in db.execute("SELECT * FROM raw_inputs")}
    assert set(recorded) == set(RAW_INPUT_FILES)
    for name, (sha256, size) in recorded.items():
        assert sha256 == packaged[name]
        assert size == (raw_inputs_dir() / name).stat().st_size


def test_validation_passes_on_the_built_database(db):
    figures = validate_database(db, CONFIG)
    assert figures["max_district_state_rel_diff"] <= CONFIG.district_state_tolerance


def test_tampered_district_total_names_the_district(built, tmp_path):
    conn = tampered_copy(
        built,
        tmp_path,
        "UPDATE targets SET value = value * 1.1"
        " WHERE geo_id = 'CA-12' AND variable = 'person_count' AND stratum = 'all'",
    )
    with pytest.raises(DatabaseValidationError, match="CA-12") as error:
        validate_database(conn, CONFIG)
    assert "\n" not in str(error.value)
    conn.close()


def test_tampered_district_with_consistent_bands_fails_state_sum(built, tmp_path):
    conn = tampered_copy(
        built,
        tmp_path,
        "UPDATE targets SET value = value * 1.5 WHERE geo_id = 'CA-12' AND variable = 'person_count'",
    )
    with pytest.raises(DatabaseValidationError, match=r"districts sum to state: CA person_count"):
        validate_database(conn, CONFIG)
    conn.close()


@pytest.mark.parametrize(
    "statement, message",
    [
        ("DELETE FROM geographies WHERE geo_id = 'WY-01'", "geographies"),
        ("DELETE FROM targets WHERE geo_id = 'TX-07' AND stratum = 'age:85:inf'", "TX-07 has 18"),
        ("UPDATE targets SET value = -1 WHERE geo_id = 'OH' AND variable = 'eitc_returns'", "target values"),
        (
            "DELETE FROM targets WHERE source = 'irs_soi' AND geo_id = 'NV' AND stratum = 'agi:1000000:inf'"
            " AND variable = 'adjusted_gross_income'",
            "state AGI brackets: NV adjusted_gross_income",
        ),
        (
            "UPDATE targets SET value = value / 1000 WHERE source = 'irs_soi' AND geo_id = 'MA'"
            " AND variable = 'adjusted_gross_income'",
            "AGI units: irs_soi MA",
        ),
        (
            "UPDATE district_counties SET population_share = population_share * 2 WHERE district_id = 'VT-01'",
            "county shares: VT-01",
        ),
    ],
)
def test_validation_catches(built, tmp_path, statement, message):
    conn = tampered_copy(built, tmp_path, statement)
    with pytest.raises(DatabaseValidationError, match=message):
        validate_database(conn, CONFIG)
    conn.close()


def test_missing_raw_input_raises_and_leaves_nothing(tmp_path):
    raw_dir = copy_raw_inputs(tmp_path / "raw")
    (raw_dir / "snap_state.csv").unlink()
    out = tmp_path / "out" / "policy_data.db"
    with pytest.raises(RawInputMissing, match="snap_state.csv"):
        build_database(out, CONFIG, raw_dir=raw_dir)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_failed_validation_publishes_nothing(tmp_path):
    raw_dir = copy_raw_inputs(tmp_path / "raw")
    snap = raw_dir / "snap_state.csv"
    lines = snap.read_text().splitlines()
    geo_id, _households, cost = lines[1].split(",")
    snap.write_text("\n".join([lines[0], f"{geo_id},-5,{cost}", *lines[2:]]) + "\n")
    out = tmp_path / "out" / "policy_data.db"
    with pytest.raises(DatabaseValidationError, match="usda_fns 2023 AL household_snap_count all = -5"):
        build_database(out, CONFIG, raw_dir=raw_dir)
    assert not any(out.parent.iterdir())


def test_builds_are_deterministic(built, db, tmp_path):
    again = tmp_path / "again.db"
    build_database(again, CONFIG)
    with contextlib.closing(sqlite3.connect(again)) as other:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            query = f"SELECT * FROM {table} ORDER BY 1, 2"
            assert db.execute(query).fetchall() == other.execute(query).fetchall(), table
    assert sha256_file(again) == sha256_file(built[0])
