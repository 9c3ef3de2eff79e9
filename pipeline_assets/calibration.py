"""calibration_package and the two independent weight fits, state_weights and national_weights."""

from pipeline_assets.materialize import stage_asset

calibration_package = stage_asset(
    "calibration_package",
    "Sparse X (targets x household clones) and the target vector; every district has records.",
    kinds={"hdf5"},
)
state_weights = stage_asset("state_weights", "L0 fit against the state and district targets.", kinds={"pytorch"})
national_weights = stage_asset("national_weights", "L0 fit against the national targets.", kinds={"pytorch"})
