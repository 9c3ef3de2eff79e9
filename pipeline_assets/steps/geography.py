"""The release's geography: 51 states, 436 congressional districts (119th Congress), NYC, the nation.

Everything is read from the packaged raw inputs, so the area list is the data's, not a hand-made one.
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from resources.files import sha256_file

PACKAGED_RAW_INPUTS = Path(__file__).resolve().parents[1] / "data" / "raw_inputs"
RAW_INPUTS_PREFIX = "raw_inputs"  # how records and TROs name a raw input: raw_inputs/NAME

# (FIPS, postal abbreviation, name) for the 50 states and DC; Puerto Rico (72) is outside the release.
STATES: tuple[tuple[str, str, str], ...] = (
    ("01", "AL", "Alabama"), ("02", "AK", "Alaska"), ("04", "AZ", "Arizona"),
    ("05", "AR", "Arkansas"), ("06", "CA", "California"), ("08", "CO", "Colorado"),
    ("09", "CT", "Connecticut"), ("10", "DE", "Delaware"), ("11", "DC", "District of Columbia"),
    ("12", "FL", "Florida"), ("13", "GA", "Georgia"), ("15", "HI", "Hawaii"),
    ("16", "ID", "Idaho"), ("17", "IL", "Illinois"), ("18", "IN", "Indiana"),
    ("19", "IA", "Iowa"), ("20", "KS", "Kansas"), ("21", "KY", "Kentucky"),
    ("22", "LA", "Louisiana"), ("23", "ME", "Maine"), ("24", "MD", "Maryland"),
    ("25", "MA", "Massachusetts"), ("26", "MI", "Michigan"), ("27", "MN", "Minnesota"),
    ("28", "MS", "Mississippi"), ("29", "MO", "Missouri"), ("30", "MT", "Montana"),
    ("31", "NE", "Nebraska"), ("32", "NV", "Nevada"), ("33", "NH", "New Hampshire"),
    ("34", "NJ", "New Jersey"), ("35", "NM", "New Mexico"), ("36", "NY", "New York"),
    ("37", "NC", "North Carolina"), ("38", "ND", "North Dakota"), ("39", "OH", "Ohio"),
    ("40", "OK", "Oklahoma"), ("41", "OR", "Oregon"), ("42", "PA", "Pennsylvania"),
    ("44", "RI", "Rhode Island"), ("45", "SC", "South Carolina"), ("46", "SD", "South Dakota"),
    ("47", "TN", "Tennessee"), ("48", "TX", "Texas"), ("49", "UT", "Utah"),
    ("50", "VT", "Vermont"), ("51", "VA", "Virginia"), ("53", "WA", "Washington"),
    ("54", "WV", "West Virginia"), ("55", "WI", "Wisconsin"), ("56", "WY", "Wyoming"),
)
STATE_ABBREV_BY_FIPS = {fips: abbrev for fips, abbrev, _ in STATES}
STATE_FIPS_BY_ABBREV = {abbrev: fips for fips, abbrev, _ in STATES}

# New York City is its five counties (FIPS 36005, 36047, 36061, 36081, 36085), named as in the
# county-to-district shares.
NYC_COUNTIES: dict[str, str] = {
    "36005": "BRONX_COUNTY_NY",
    "36047": "KINGS_COUNTY_NY",
    "36061": "NEW_YORK_COUNTY_NY",
    "36081": "QUEENS_COUNTY_NY",
    "36085": "RICHMOND_COUNTY_NY",
}

AREA_COUNT = 488

DISTRICT_LIST = "acs5_congressional_districts_2024.json"
COUNTY_SHARES = "county_cd_distributions.csv"
DISTRICT_POPULATIONS = "acs_S0101_district_2024.json.gz"
# Census 2020 county FIPS codes (state, county name, five-digit code), as policyengine-us 2.68.0 ships
# them (policyengine_us/data/county_fips_2020.csv.gz): the key from the shares' county names to FIPS.
COUNTY_FIPS = "county_fips_2020.csv.gz"
# The raw inputs the helpers below read: a step that calls them reads these.
GEOGRAPHY_FILES = (DISTRICT_LIST, COUNTY_SHARES, DISTRICT_POPULATIONS)


class RawInputMissing(FileNotFoundError):
    """A raw input the ETL needs is not where it should be."""


def raw_inputs_dir() -> Path:
    """The packaged raw inputs (shipped as package data; never downloaded at run time)."""
    return PACKAGED_RAW_INPUTS


def raw_input(name: str, raw_dir: Path | None = None) -> Path:
    path = (raw_dir or raw_inputs_dir()) / name
    if not path.is_file():
        raise RawInputMissing(f"raw input {name!r} not found at {path}: expected the packaged file")
    return path


def raw_input_sha256(names: tuple[str, ...], raw_dir: Path | None = None) -> dict[str, str]:
    """{name: sha256} of the raw inputs `names` as their bytes are now."""
    return {name: sha256_file(raw_input(name, raw_dir)) for name in names}


def located_raw_input(name: str, raw_dir: Path | None) -> tuple[Path, str]:
    """(path, sha256) of a raw input: the parsed helpers below are cached by content, so a file
    changed on disk is read again instead of being answered from memory."""
    path = raw_input(name, raw_dir)
    return path, sha256_file(path)


@dataclass(frozen=True)
class Area:
    """One local area file of a release."""

    kind: str  # "state" | "district" | "city" | "national"
    code: str  # "AL", "AL-01", "NYC", "US"
    state_fips: str | None

    @property
    def relpath(self) -> str:
        folder = {"state": "states", "district": "districts", "city": "cities", "national": "national"}
        return f"{folder[self.kind]}/{self.code}.h5"


def district_code(state_fips: str, number: str) -> str:
    """AL-01 style; at-large districts (00 upstream, 98 for DC) are numbered 01."""
    n = int(number)
    return f"{STATE_ABBREV_BY_FIPS[state_fips]}-{1 if n in (0, 98) else n:02d}"


def district_geoid(state_fips: str, number: str) -> str:
    """The key of the county-to-district shares file: int(state) * 100 + district number."""
    return str(int(state_fips) * 100 + int(number))


def districts(raw_dir: Path | None = None) -> tuple[tuple[str, str, str], ...]:
    """(code, state_fips, upstream district number) for the 436 districts, in state then number order."""
    return _districts(*located_raw_input(DISTRICT_LIST, raw_dir))


@functools.lru_cache(maxsize=4)
def _districts(path: Path, _sha256: str) -> tuple[tuple[str, str, str], ...]:
    rows = json.loads(path.read_text())
    out = [
        (district_code(state, number), state, number)
        for _name, state, number in rows[1:]
        if state in STATE_ABBREV_BY_FIPS and number.isdigit()  # ZZ rows: 'not defined' areas
    ]
    return tuple(sorted(out, key=lambda row: (row[1], row[0])))


def district_county_shares(raw_dir: Path | None = None) -> dict[str, tuple[tuple[str, float], ...]]:
    """District code -> ((county name, population share), ...), shares summing to 1."""
    return _district_county_shares(*located_raw_input(COUNTY_SHARES, raw_dir), districts(raw_dir))


@functools.lru_cache(maxsize=4)
def _district_county_shares(
    path: Path, _sha256: str, district_rows: tuple[tuple[str, str, str], ...]
) -> dict[str, tuple[tuple[str, float], ...]]:
    by_geoid = {district_geoid(state, number): code for code, state, number in district_rows}
    shares: dict[str, list[tuple[str, float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            code = by_geoid.get(row["cd_geoid"])
            if code is not None:
                shares.setdefault(code, []).append((row["county_name"], float(row["probability"])))
    normalised = {}
    for code, pairs in shares.items():
        total = sum(p for _, p in pairs)
        normalised[code] = tuple((county, p / total) for county, p in pairs)
    return normalised


def county_name_key(name: str, state: str) -> str:
    """The shares file's (and PolicyEngine's County enum's) name of a county: "St. Mary's County", "MD"
    -> "ST_MARY_S_COUNTY_MD"."""
    return f"{name.replace(' ', '_').replace('-', '_').replace('.', '').replace(chr(39), '_').strip().upper()}_{state}"


def county_fips(raw_dir: Path | None = None) -> dict[str, str]:
    """County name as the shares file writes it -> its five-digit FIPS code."""
    return _county_fips(*located_raw_input(COUNTY_FIPS, raw_dir))


@functools.lru_cache(maxsize=4)
def _county_fips(path: Path, _sha256: str) -> dict[str, str]:
    import gzip

    with gzip.open(path, "rt", newline="", encoding="utf-8") as handle:
        return {county_name_key(row["county_name"], row["state"]): row["county_fips"] for row in csv.DictReader(handle)}


def district_number(code: str) -> int:
    """AL-01 -> 1: the district's number as the release numbers it (at-large seats are 1)."""
    return int(code.split("-")[1])


def areas(raw_dir: Path | None = None) -> tuple[Area, ...]:
    """The 488 local areas in release order: states, districts, cities."""
    out = [Area("state", abbrev, fips) for fips, abbrev, _ in STATES]
    out += [Area("district", code, state) for code, state, _ in districts(raw_dir)]
    out.append(Area("city", "NYC", "36"))
    return tuple(out)


NATIONAL = Area("national", "US", None)


def district_populations(raw_dir: Path | None = None) -> dict[str, float]:
    """District code -> total population (ACS S0101, 2024 5-year)."""
    return _district_populations(*located_raw_input(DISTRICT_POPULATIONS, raw_dir))


@functools.lru_cache(maxsize=4)
def _district_populations(path: Path, _sha256: str) -> dict[str, float]:
    import gzip

    with gzip.open(path, "rt") as handle:
        rows = json.load(handle)
    header = rows[0]
    geo, total = header.index("GEO_ID"), header.index("S0101_C01_001E")
    out = {}
    for row in rows[1:]:
        state, number = row[geo][-4:-2], row[geo][-2:]
        if state in STATE_ABBREV_BY_FIPS:
            out[district_code(state, number)] = float(row[total])
    return out


CITY_NAMES = {"NYC": "New York City (the Bronx, Brooklyn, Manhattan, Queens and Staten Island)"}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def area_names(raw_dir: Path | None = None) -> dict[str, str]:
    """Area code -> what people call it: "Alabama", "Alabama's 1st congressional district" ("Alaska's
    at-large congressional district" where a state has one seat), "New York City (...)", "the United States"."""
    rows = districts(raw_dir)
    seats = Counter(fips for _, fips, _ in rows)
    names = {abbrev: name for _, abbrev, name in STATES}
    for code, fips, _ in rows:
        seat = "at-large" if seats[fips] == 1 else _ordinal(district_number(code))
        names[code] = f"{names[STATE_ABBREV_BY_FIPS[fips]]}'s {seat} congressional district"
    return {**names, **CITY_NAMES, NATIONAL.code: "the United States"}
