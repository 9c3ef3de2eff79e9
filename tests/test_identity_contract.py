"""The identity contract: each field moves exactly the identity it should."""

from __future__ import annotations

import pytest

from pipeline_assets.identity_contract import CONFIG_EXCLUDED_FIELDS, config_hash, env_id
from pipeline_assets.steps.config import config_for_scale
from resources.runtime import capture

BASE = config_for_scale("tiny")


@pytest.fixture(scope="module")
def env():
    return capture()


def with_library(env, name, version):
    return env.model_copy(update={"library_versions": {**env.library_versions, name: version}})


@pytest.mark.parametrize(
    "overrides",
    [
        {"local_fit": {"epochs": 7}},
        {"national_fit": {"lambda_l0": 0.5}},
        {"local_fit": {"lambda_l2": 0.01}},
        {"national_fit": {"device": "cuda"}},  # a GPU fit computes other weights
        {"dataset": {"seed": 3}},
        {"calibration": {"clones": 3}},
        {"calibration": {"target_variables": ("person_count",)}},
        {"build_database": False},
        {"quality": {"max_mean_rel_abs_error": 0.1}},
        {"quality": {"history_factor": 2.0}},  # hashed like the other quality thresholds
    ],
)
def test_config_fields_move_config_hash_only(env, overrides):
    changed = config_for_scale("tiny", **overrides)
    assert config_hash(changed) != config_hash(BASE)
    assert env_id(env) == env_id(env)  # env_id does not read the config at all


@pytest.mark.parametrize("library", ["numpy", "scipy", "scikit-learn", "quantile-forest", "torch", "l0-python", "h5py"])
def test_library_versions_move_env_id_only(env, library):
    changed = with_library(env, library, "0.0.0-test")
    assert env_id(changed) != env_id(env)
    assert config_hash(BASE) == config_hash(config_for_scale("tiny"))


def test_python_version_moves_env_id(env):
    assert env_id(env.model_copy(update={"python_version": "3.12.0"})) != env_id(env)


@pytest.mark.parametrize(
    "overrides",
    [{"labels": {"owner": "someone"}}, {"areas": {"workers": 7}}, {"local_fit": {"threads": 4}},
     {"national_fit": {"threads": 2}}, {"reuse": False}],
)
def test_excluded_config_fields_change_neither(env, overrides):
    changed = config_for_scale("tiny", **overrides)
    assert config_hash(changed) == config_hash(BASE)


def test_scale_name_is_a_label(env):
    same_numbers = config_for_scale("small", **{k: v for k, v in config_for_scale("tiny").model_dump().items() if k != "scale"})
    assert config_hash(same_numbers) == config_hash(BASE)
    assert "scale" in CONFIG_EXCLUDED_FIELDS


def test_non_identity_environment_fields_change_neither(env):
    for update in [{"hostname": "elsewhere"}, {"cloud_region": "us-east4"}, {"compute_pool": "gpu"},
                   {"instance_id": "task-1"}, {"cpu_count": 64}, {"library_versions": {**env.library_versions, "dagster": "9.9.9"}}]:
        assert env_id(env.model_copy(update=update)) == env_id(env), update


def test_image_digest_replaces_the_installed_distributions(env):
    in_image = env.model_copy(update={"container_image_digest": "sha256:" + "a" * 64})
    assert env_id(in_image) != env_id(env)
    other_dists = in_image.model_copy(update={"installed_distributions_sha256": "0" * 64})
    assert env_id(other_dists) == env_id(in_image)
    assert env_id(env.model_copy(update={"installed_distributions_sha256": "0" * 64})) != env_id(env)
