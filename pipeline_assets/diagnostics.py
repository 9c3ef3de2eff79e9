"""run_diagnostics: calibration logs of both fits, validation per area, and the run's config."""

from pipeline_assets.materialize import stage_asset

run_diagnostics = stage_asset(
    "run_diagnostics",
    "Per-area validation (target vs weighted estimate) and the calibration log, for review.",
    kinds={"csv"},
)
