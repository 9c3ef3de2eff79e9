"""source_datasets: the CPS household sample with persons, geography and QRF-imputed variables."""

from pipeline_assets.materialize import stage_asset

source_datasets = stage_asset(
    "source_datasets",
    "Real CPS tax units grouped into households; the same seed gives the same bytes.",
    kinds={"hdf5"},
)
