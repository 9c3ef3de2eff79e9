"""The 488 local-area files plus national_h5: one subsettable multi-asset step over the worker pool.

Not one Dagster step per area: each step process costs about half a second here, and run_id x area
multi-partitions would hit Dagster's partition limits within a few hundred runs.
"""


from typing import Iterator

from dagster import AssetExecutionContext, AssetKey, AssetSpec, MaterializeResult, multi_asset

from pipeline_assets import stages
from pipeline_assets.driver import recorded_step
from pipeline_assets.materialize import OWNERS, file_metadata, identity_metadata, rounded, worker_environment_metadata
from pipeline_assets.partitions import run_ids
from pipeline_assets.run_start import open_run
from pipeline_assets.steps import geography
from pipeline_assets.steps.database import population_targets
from pipeline_assets.tro import revise_tro
from resources.dagster_resources import CodeResource, ComputeResource, LineageResource, RunStoreResource, RuntimeResource

AREA_GROUPS = {"state": "states", "district": "districts", "city": "cities"}
NATIONAL_KEY = AssetKey("national_h5")


def area_key(area: geography.Area) -> AssetKey:
    if area.kind == "national":
        return NATIONAL_KEY
    return AssetKey([AREA_GROUPS[area.kind], area.code.replace("-", "_")])


ALL_AREAS = (*geography.areas(), geography.NATIONAL)
AREA_BY_KEY = {area_key(area): area for area in ALL_AREAS}
KEY_BY_CODE = {area.code: key for key, area in AREA_BY_KEY.items()}
AREA_KEYS = tuple(AREA_BY_KEY)
AREA_NAMES = geography.area_names()
POPULATION_TARGETS = population_targets()


def describe(area: geography.Area) -> str:
    """The area by name, with the population target its weights are calibrated to."""
    target = POPULATION_TARGETS.get(area.code)
    calibrated = (f"calibrated to a population of {target:,.0f} (ACS S0101)" if target is not None
                  else "not a calibration geography (no population target of its own): its counties' records and weights")
    return f"{AREA_NAMES[area.code]}: {area.relpath}, {calibrated}."


def _spec(area: geography.Area) -> AssetSpec:
    """An area file reads the dataset, the package and the weights of its own fit (stages.AREA_PART_INPUTS)."""
    part = stages.area_part(area)
    return AssetSpec(
        area_key(area),
        group_name=AREA_GROUPS.get(area.kind, "release"),
        deps=[AssetKey(name) for name in stages.AREA_PART_INPUTS[part]],
        kinds={"hdf5"},
        description=describe(area),
        skippable=True,
        owners=OWNERS,
        tags={"stage": "local_areas", "layer": "release", "area_kind": area.kind, "fit": part},
    )


@multi_asset(
    name="local_areas",
    specs=[_spec(area) for area in ALL_AREAS],
    partitions_def=run_ids,
    can_subset=True,
    code_version=stages.STEPS["local_areas"].code_version,
)
def local_areas(
    context: AssetExecutionContext,
    run_store: RunStoreResource,
    compute: ComputeResource,
    runtime: RuntimeResource,
    code: CodeResource,
    lineage: LineageResource,
) -> Iterator[MaterializeResult]:
    """Build the selected area files (all 489 by default) on the compute pool, each materialized as
    soon as its file is written: Dagster's ~20 ms of bookkeeping per area overlaps the building."""
    store = run_store.store()
    run_id = context.partition_key
    meta = open_run(context, store)
    selected = {AREA_BY_KEY[key].code for key in context.selected_asset_keys}
    codes = None if len(selected) == len(AREA_BY_KEY) else selected  # None: the whole step, reusable by part
    env = runtime.capture()
    pool = compute.pool(meta.sha)
    h5_root = store.path(store.run_key(run_id, stages.H5_ROOT))
    shared: dict = {}

    def metadata(result, probe) -> dict:
        if not shared:  # at the first file: a remote pool knows its workers' environments by then
            shared.update(identity_metadata(meta, probe), **worker_environment_metadata(pool, env))
            if probe.reuse == "rebuilt":  # a verified backfill of a completed run: a new TRO revision records it
                shared["tro_revision"] = revise_tro(store, run_id).name
        reused = {"reuse": "reused", "reused_from": result.reused_from} if result.reused_from else {}
        return {
            **shared,
            **reused,
            **file_metadata(h5_root / result.relpath, result.sha256),
            "households": result.households,
            "weight_sum": rounded(result.weight_sum),
            "population": rounded(result.population),
        }

    with recorded_step(store, run_id, "local_areas", code.running_sha(), lineage.lineage(store)) as outcome:
        probe = stages.area_probe(store, run_id, env)  # the step's identity, as its record will have it
        stream = stages.stream_areas(store, run_id, pool, probe, codes)
        while True:
            try:
                result = next(stream)
            except StopIteration as done:
                outcome.record = done.value
                break
            yield MaterializeResult(asset_key=KEY_BY_CODE[result.area], metadata=metadata(result, probe))
