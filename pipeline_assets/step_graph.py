"""The steps of a release in order, and the upstream steps whose outputs each one reads.

Shared by the stages that run the steps and the TRO that describes them, so that neither imports the other.
"""

STEP_ORDER = (
    "policy_data_db",
    "source_datasets",
    "calibration_package",
    "state_weights",
    "national_weights",
    "local_areas",
    "run_diagnostics",
    "model_validation",
)
STEP_INPUTS = {
    "policy_data_db": (),
    "source_datasets": (),
    "calibration_package": ("policy_data_db", "source_datasets"),
    "state_weights": ("calibration_package",),
    "national_weights": ("calibration_package",),
    "local_areas": ("source_datasets", "calibration_package", "state_weights", "national_weights"),
    "run_diagnostics": ("calibration_package", "state_weights", "national_weights"),
    "model_validation": ("policy_data_db", "local_areas"),
}
