"""Typed configuration of every step, and the named scales a run can be made at."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline_assets.steps import geography
from pipeline_assets.steps.uprating import check_period


class StepConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseConfig(StepConfig):
    """ETL of the targets database from the packaged raw inputs."""

    soi_national_year: int = 2022
    # District populations must sum to their state's within this relative tolerance.
    district_state_tolerance: float = Field(0.001, gt=0)


class DatasetConfig(StepConfig):
    """The household sample drawn from the CPS tax units, and the QRF imputation."""

    households: int = Field(2000, ge=51)
    seed: int = 0
    min_households_per_state: int = Field(2, ge=1)
    qrf_donors: int = Field(4000, ge=50)
    qrf_trees: int = Field(40, ge=1)
    # The release's year: money is uprated to it, and the area files hold their arrays for it.
    period: int = 2024

    @field_validator("period")
    @classmethod
    def _covered(cls, period: int) -> int:
        return check_period(period)


class CalibrationConfig(StepConfig):
    """The target matrix: household clones placed in districts, and which targets to use."""

    clones: int = Field(5, ge=1)
    seed: int = 0
    # None means every target in the database.
    target_variables: tuple[str, ...] | None = None


class FitConfig(StepConfig):
    """One L0-regularised weight fit (l0-python's SparseCalibrationWeights)."""

    scope: Literal["local", "national"]
    epochs: int = Field(200, ge=1)
    lambda_l0: float = Field(1e-6, ge=0)
    lambda_l2: float = Field(0.0, ge=0)
    learning_rate: float = Field(0.15, gt=0)
    init_keep_prob: float = Field(0.9, gt=0, lt=1)
    seed: int = 0
    # CPU threads; None: the compute resource's share of the cores where the fit runs, divided among
    # the fits running there at the moment (all of them in the bare driver or a Modal container).
    threads: int | None = Field(None, ge=1)
    # Where the fit's tensors live: "cuda" needs a GPU where the fit runs (Modal's fit_remote, or a
    # local one). Hashed into config_hash: a GPU fit draws other random numbers and sums in another
    # order, so its weights differ from a CPU fit's.
    device: Literal["cpu", "cuda"] = "cpu"


class AreaConfig(StepConfig):
    """The 488 local-area files, built by a pool of workers."""

    workers: int = Field(2, ge=1)


class ModelValidationConfig(StepConfig):
    """PolicyEngine-US run on a sample of the area files before the release is staged."""

    # Area codes (AL, AL-01, NYC, US) or "all"; empty: the model is not run and the record says so.
    areas: tuple[str, ...] | Literal["all"] = ("AL", "AL-01", "NYC")
    # How far the model's person count may be from the release's weighted population (relative):
    # the file holds float32 weights, which the model sums in float32.
    person_tolerance: float = Field(1e-4, gt=0)

    @field_validator("areas")
    @classmethod
    def _known(cls, areas):
        if areas == "all" or not areas:  # nothing to look up: every step parses the configuration
            return areas
        known = {area.code for area in (*geography.areas(), geography.NATIONAL)}
        unknown = sorted(set(areas) - known)
        if unknown:
            raise ValueError(f"unknown area codes {unknown}: expected codes of the release (AL, AL-01, NYC, US, ...) or 'all'")
        return areas


class QualityConfig(StepConfig):
    """Thresholds of the calibration-quality checks on both fits: absolute limits (blocking), and how
    far a fit may fall behind its provenance class's history before a warning (non-blocking)."""

    max_mean_rel_abs_error: float = Field(0.5, gt=0)
    max_max_rel_abs_error: float = Field(10.0, gt=0)
    # Warn when the final mean rel_abs_error exceeds this times the median of the completed runs
    # with the same config_hash and dataset (the class's history).
    history_factor: float = Field(1.5, gt=1)


class RunConfig(StepConfig):
    """Everything a release run is made from."""

    scale: str = "small"
    labels: dict[str, str] = Field(default_factory=dict)
    # Reuse an earlier run's output of a step whose code, environment, config and inputs match.
    reuse: bool = True
    build_database: bool = True
    database: DatabaseConfig = DatabaseConfig()
    dataset: DatasetConfig = DatasetConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    local_fit: FitConfig = FitConfig(scope="local")
    national_fit: FitConfig = FitConfig(scope="national")
    areas: AreaConfig = AreaConfig()
    model_validation: ModelValidationConfig = ModelValidationConfig()
    quality: QualityConfig = QualityConfig()


SCALES: dict[str, dict] = {
    # The tests' scale: runs there leave the model out unless a test asks for it (an import of
    # policyengine-us alone takes half a minute).
    "tiny": {
        "dataset": {"households": 2000, "qrf_donors": 400, "qrf_trees": 10},
        "model_validation": {"areas": []},
        "calibration": {"clones": 5},
        "local_fit": {"scope": "local", "epochs": 150},
        "national_fit": {"scope": "national", "epochs": 150},
    },
    "small": {
        "dataset": {"households": 2000},
        "calibration": {"clones": 5},
        "local_fit": {"scope": "local", "epochs": 200},
        "national_fit": {"scope": "national", "epochs": 200},
    },
    "reference": {
        "dataset": {"households": 8000, "qrf_donors": 8000, "qrf_trees": 60},
        "calibration": {"clones": 25},
        "local_fit": {"scope": "local", "epochs": 400},
        "national_fit": {"scope": "national", "epochs": 400},
    },
    # Production's column count (12,000 households x 430 clones = 5.16M) on the reference's epochs:
    # about 4 minutes and 12 GB through the bare driver on 2 cores.
    "large": {
        "dataset": {"households": 12000, "qrf_donors": 8000, "qrf_trees": 60},
        "calibration": {"clones": 430},
        "local_fit": {"scope": "local", "epochs": 400},
        "national_fit": {"scope": "national", "epochs": 400},
    },
}


def config_for_scale(scale: str, **overrides) -> RunConfig:
    """The RunConfig of a named scale, with section overrides such as local_fit={"epochs": 5}."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    sections = {name: dict(values) for name, values in SCALES[scale].items()}
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            sections.setdefault(key, {}).update(value)
        else:
            flat[key] = value
    return RunConfig.model_validate({"scale": scale, **sections, **flat})
