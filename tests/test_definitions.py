"""The code location loads, with the asset keys, groups, partitions and checks of the design."""

from dagster import AssetKey, DynamicPartitionsDefinition

from pipeline_assets import defs
from pipeline_assets.checks import ALL_CHECKS
from pipeline_assets.steps import geography

RELEASE = ["staged_release", "promotion"]
STAGES = ["policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights", "run_diagnostics",
          "model_validation"]


def test_asset_keys_and_groups():
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    assert len(keys) == len(STAGES) + geography.AREA_COUNT + 1 + len(RELEASE)
    for stage in STAGES + ["national_h5"] + RELEASE:
        assert AssetKey(stage) in keys
    groups: dict[str, set] = {}
    for key in keys:
        groups.setdefault(graph.get(key).group_name, set()).add(key)
    assert len(groups["states"]) == 51 and len(groups["districts"]) == 436 and groups["cities"] == {AssetKey(["cities", "NYC"])}
    assert AssetKey(["states", "AL"]) in groups["states"] and AssetKey(["districts", "DC_01"]) in groups["districts"]
    assert groups["release"] == {AssetKey(s) for s in STAGES + ["national_h5"] + RELEASE}


def test_every_asset_is_partitioned_by_run_id_promotion_by_version_and_versioned():
    """A run is a run_id partition of every release asset; the registry's versions are promotion's."""
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        expected = "release_versions" if key == AssetKey("promotion") else "run_ids"
        assert isinstance(node.partitions_def, DynamicPartitionsDefinition) and node.partitions_def.name == expected
        assert node.code_version


def test_every_multi_asset_check_is_subsettable():
    """Else the UI cannot materialize one asset whose checks share a step with another's."""
    assert all(checks.can_subset for checks in ALL_CHECKS if len(checks.check_keys) > 1)


def test_fits_are_independent_and_areas_are_one_subsettable_step():
    graph = defs.resolve_asset_graph()
    assert AssetKey("state_weights") not in graph.get(AssetKey("national_weights")).parent_keys
    area_nodes = {graph.get(AssetKey(["states", "AL"])).assets_def, graph.get(AssetKey("national_h5")).assets_def}
    (assets_def,) = area_nodes
    assert assets_def.can_subset and len(assets_def.keys) == 489


def test_checks_cover_hashes_areas_quality_and_skew():
    check_keys = {(k.asset_key.to_user_string(), k.name) for c in ALL_CHECKS for k in c.check_keys}
    for stage in STAGES:
        assert (stage, "sha256_verified") in check_keys
    assert ("state_weights", "calibration_quality") in check_keys and ("national_weights", "calibration_quality") in check_keys
    assert ("national_h5", "all_areas_present") in check_keys and ("national_h5", "no_version_skew") in check_keys
    assert ("staged_release", "staged_files_verified") in check_keys
    job = defs.resolve_job_def("release")
    assert job.partitions_def.name == "run_ids"


def test_promotion_is_outside_the_release_job():
    release = defs.resolve_job_def("release").asset_layer.selected_asset_keys
    assert AssetKey("staged_release") in release and AssetKey("promotion") not in release
    assert defs.resolve_job_def("promote").asset_layer.selected_asset_keys == {AssetKey("promotion")}
