"""Money in the release period's dollars: each record's amounts are scaled from its survey year by
the BLS CPI-U annual average (all items, U.S. city average, not seasonally adjusted, 1982-84=100;
series CUUR0000SA0), shipped as a raw input."""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline_assets.steps.geography import located_raw_input

CPI_FILE = "cpi_u_annual_average.csv"
# The years the shipped table covers, for checking a configuration without opening the file (a test
# keeps them equal to the file's; the datasets step checks the file itself).
CPI_YEARS = (2010, 2024)


class PeriodNotCovered(ValueError):
    """A year the shipped price index has no annual average for."""


def cpi_u(raw_dir: Path | None = None) -> dict[int, float]:
    """Year -> CPI-U annual average."""
    return _cpi_u(*located_raw_input(CPI_FILE, raw_dir))


@functools.lru_cache(maxsize=4)
def _cpi_u(path: Path, _sha256: str) -> dict[int, float]:
    with path.open(newline="") as handle:
        return {int(row["year"]): float(row["cpi_u"]) for row in csv.DictReader(handle)}


def check_period(year: int, covered: Iterable[int] = range(CPI_YEARS[0], CPI_YEARS[1] + 1)) -> int:
    covered = sorted(covered)
    if year not in covered:
        raise PeriodNotCovered(f"period {year}: expected a year the CPI-U table {CPI_FILE} covers "
                               f"({covered[0]}-{covered[-1]})")
    return year


def uprating_factors(survey_years: np.ndarray, period: int, raw_dir: Path | None = None) -> np.ndarray:
    """CPI-U(period) / CPI-U(survey year), one per record."""
    index = cpi_u(raw_dir)
    for year in (period, *np.unique(survey_years)):
        check_period(int(year), index)
    years = np.asarray(survey_years, dtype=int)
    return index[period] / np.vectorize(index.__getitem__, otypes=[float])(years)
