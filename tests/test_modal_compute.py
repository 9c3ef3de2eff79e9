"""ModalCompute against an injected Modal function double: the real step code runs, nothing leaves the machine."""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline_assets import modal_app, modal_model_app
from pipeline_assets.identity import VersionSkewError
from pipeline_assets.stages import H5_ROOT, artifact, fit_config
from pipeline_assets.steps import geography
from pipeline_assets.steps.config import FitConfig, RunConfig
from pipeline_assets.steps.local_areas import build_area_h5, load_area_inputs
from pipeline_assets.steps.weights import fit_weights
from resources import model_environment
from resources.compute import stripes
from resources.files import sha256_file
from resources.modal_compute import ModalCompute
from resources.model_environment import ModelEnvironment
from tests.conftest import PINNED_SHA
from tests.policyengine_dataset import PERIOD, write_area

OTHER_SHA = "0badc0de" + "f" * 32
REPO = Path(__file__).resolve().parents[1]
AREA_ARTIFACTS = ("source_datasets", "calibration_package", "state_weights", "national_weights")


class FakeModalFunction:
    """Stands in for modal.Function: records every call and runs the function's body in a fake container.

    Arguments and replies are pickled as Modal would; inside a call the environment is the image's
    (PIPELINE_CODE_SHA) and Modal's region, task and image variables.
    """

    tasks = itertools.count(1)

    def __init__(self, body, monkeypatch, image_sha=PINNED_SHA, options=None, log=None):
        self.body, self.monkeypatch, self.image_sha = body, monkeypatch, image_sha
        self.options = options or {}
        self.log = log if log is not None else SimpleNamespace(remote=[], map=[], options=[])

    def with_options(self, **options):
        self.log.options.append(options)
        return FakeModalFunction(self.body, self.monkeypatch, self.image_sha, {**self.options, **options}, self.log)

    def remote(self, *args):
        self.log.remote.append(args)
        return self._run(args)

    def map(self, *iterables):
        calls = list(zip(*iterables))
        self.log.map.append(calls)
        return (self._run(args) for args in calls)

    def _run(self, args):
        with self.monkeypatch.context() as env:
            env.setenv("PIPELINE_CODE_SHA", self.image_sha)
            env.setenv("MODAL_REGION", "us-east-1")
            env.setenv("MODAL_CLOUD_PROVIDER", "aws")
            env.setenv("MODAL_IMAGE_ID", "im-usdata123")
            env.setenv("MODAL_TASK_ID", f"ta-{next(self.tasks)}")
            if "gpu" in self.options:
                env.setenv("PIPELINE_COMPUTE_POOL", f"modal-gpu-{self.options['gpu']}")
            return pickle.loads(pickle.dumps(self.body(*pickle.loads(pickle.dumps(args)))))


def fake_functions(monkeypatch, image_sha=PINNED_SHA):
    return SimpleNamespace(
        fit_remote=FakeModalFunction(modal_app.fit_from_bytes, monkeypatch, image_sha),
        build_areas_remote=FakeModalFunction(modal_app.areas_from_bytes, monkeypatch, image_sha),
    )


def area_args(tiny_release):
    store, meta, _ = tiny_release
    return tuple(artifact(store, meta.run_id, name) for name in AREA_ARTIFACTS)


def some_areas(n):
    everything = [*geography.areas(), geography.NATIONAL]
    return [everything[i] for i in (0, 5, 60, 61, 487, 488)[:n]]  # states, districts, NYC, US


def test_stripes_fan_out_to_at_most_the_workers():
    assert stripes(list(range(6)), 3) == [[0, 3], [1, 4], [2, 5]]
    assert stripes(list(range(2)), 50) == [[0], [1]]
    assert sum(map(len, stripes(list(range(489)), 50))) == 489 and len(stripes(list(range(489)), 50)) == 50


@pytest.mark.parametrize("workers, n_areas, width", [(3, 6, 3), (50, 2, 2)])
def test_areas_fan_out_and_are_written_by_the_orchestrator(tiny_release, tmp_path, monkeypatch, workers, n_areas, width):
    store, meta, _ = tiny_release
    functions = fake_functions(monkeypatch)
    compute = ModalCompute(workers=workers, functions=functions, pinned_sha=PINNED_SHA)
    areas = some_areas(n_areas)

    results = compute.map_with_inputs(build_area_h5, areas, load_area_inputs, area_args(tiny_release), tmp_path)

    (calls,) = functions.build_areas_remote.log.map  # one .map, `width` containers
    assert len(calls) == width
    assert all(sha == PINNED_SHA for _, _, sha in calls)
    assert sorted(code for _, codes, _ in calls for code in codes) == sorted(a.code for a in areas)
    assert set(calls[0][0]) == set(modal_app.AREA_INPUTS)
    assert [r.area for r in results] == [a.code for a in areas]
    for area, result in zip(areas, results):
        assert sha256_file(tmp_path / area.relpath) == result.sha256  # what the remote computed
        # the same bytes as the local pool's file of the tiny run
        assert result.sha256 == sha256_file(store.path(store.run_key(meta.run_id, f"{H5_ROOT}/{area.relpath}")))
    assert len(compute.last_environments) == width
    assert {e.cloud_region for e in compute.last_environments} == {"us-east-1"}
    assert {e.container_image_digest for e in compute.last_environments} == {"im-usdata123"}
    assert {e.cloud_provider for e in compute.last_environments} == {"aws"}
    assert len({e.instance_id for e in compute.last_environments}) == width  # one task per chunk
    assert all(e.instance_id.startswith("ta-") for e in compute.last_environments)


def test_fit_runs_on_the_configured_gpu_and_returns_its_environment(tiny_release, tmp_path, monkeypatch):
    store, meta, _ = tiny_release
    config = fit_config(RunConfig.model_validate(meta.config), "national_weights")
    functions = fake_functions(monkeypatch)
    compute = ModalCompute(gpu="H100", functions=functions, pinned_sha=PINNED_SHA)

    result = compute.fit(fit_weights, artifact(store, meta.run_id, "calibration_package"), tmp_path / "w.npy", tmp_path / "log.csv", config)

    log = functions.fit_remote.log
    assert log.options == [{"gpu": "H100"}]
    assert [args[2] for args in log.remote] == [PINNED_SHA]
    assert result.outputs == {"weights": tmp_path / "w.npy", "calibration_log": tmp_path / "log.csv"}
    assert result.figures["targets"] > 0 and result.figures["epochs"] == config.epochs
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), np.load(artifact(store, meta.run_id, "national_weights")))
    (env,) = compute.last_environments
    assert (env.cloud_region, env.container_image_digest, env.compute_pool) == ("us-east-1", "im-usdata123", "modal-gpu-H100")
    assert env.instance_id.startswith("ta-")


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the double's fit would run on the GPU")
def test_a_cuda_fit_reaches_the_remote_as_cuda(tiny_release, tmp_path, monkeypatch):
    """The device travels in the fit's config: the remote fits on its GPU (this double has none, so
    it refuses the way a container without a GPU would), and nothing is written here."""
    store, meta, _ = tiny_release
    config = fit_config(RunConfig.model_validate(meta.config), "state_weights").model_copy(update={"device": "cuda"})
    functions = fake_functions(monkeypatch)
    compute = ModalCompute(gpu="H100", functions=functions, pinned_sha=PINNED_SHA)
    with pytest.raises(ValueError, match="local fit device 'cuda'"):
        compute.fit(fit_weights, artifact(store, meta.run_id, "calibration_package"), tmp_path / "w.npy", tmp_path / "log.csv", config)
    (call,) = functions.fit_remote.log.remote
    assert FitConfig.model_validate_json(call[1]).device == "cuda"
    assert not (tmp_path / "w.npy").exists()


def test_a_remote_running_other_code_refuses(tiny_release, tmp_path, monkeypatch):
    store, meta, _ = tiny_release
    compute = ModalCompute(workers=2, functions=fake_functions(monkeypatch, image_sha=OTHER_SHA), pinned_sha=PINNED_SHA)
    with pytest.raises(VersionSkewError) as areas_error:
        compute.map_with_inputs(build_area_h5, some_areas(2), load_area_inputs, area_args(tiny_release), tmp_path)
    config = fit_config(RunConfig.model_validate(meta.config), "state_weights")
    with pytest.raises(VersionSkewError) as fit_error:
        compute.fit(fit_weights, artifact(store, meta.run_id, "calibration_package"), tmp_path / "w.npy", tmp_path / "log.csv", config)
    for error in (areas_error, fit_error):
        assert PINNED_SHA in str(error.value) and OTHER_SHA in str(error.value)
    assert not list(tmp_path.rglob("*"))  # nothing written
    assert compute.last_environments == []


def test_only_the_step_functions_the_app_deploys_can_be_mapped(tmp_path, monkeypatch):
    compute = ModalCompute(functions=fake_functions(monkeypatch), pinned_sha=PINNED_SHA)
    with pytest.raises(ValueError, match="build_area_h5"):
        compute.map_with_inputs(print, some_areas(1), load_area_inputs, (), tmp_path)


# The model's container, stood in for by the model environment (the image's exact pins): the runner's
# Modal body run by its interpreter, with the image's variables; what the model prints goes to stderr.
IN_MODEL_IMAGE = """
import os, pickle, sys
sys.path.insert(0, sys.argv[1])
from resources.model_runner import serve
answer = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
pickle.dump(serve(*pickle.load(sys.stdin.buffer)), answer)
"""


def model_container(image_lock_sha256):
    def body(files, period, lock_sha256):
        image = {**os.environ, "PIPELINE_MODEL_LOCK_SHA256": image_lock_sha256, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([str(ModelEnvironment().env_python), "-I", "-c", IN_MODEL_IMAGE, str(REPO)], env=image,
                              input=pickle.dumps((files, period, lock_sha256)), capture_output=True)
        if done.returncode:
            raise RuntimeError(done.stderr.decode().strip().splitlines()[-1])
        return pickle.loads(done.stdout)
    return body


def test_the_model_runs_in_its_image_and_names_the_same_environment_as_locally(tmp_path, monkeypatch):
    """The files go as bytes; the figures come back under the paths asked for, with the environment
    identified as the local one is (the same lock on the same interpreter: the same env_id)."""
    model = ModelEnvironment()
    model.ensure()
    alabama = write_area(tmp_path / "AL.h5")
    other = write_area(tmp_path / "CA.h5", weights=(10.0, 20.0, 30.0))
    functions = SimpleNamespace(model_remote=FakeModalFunction(model_container(model.lock_sha256()), monkeypatch))
    run = ModalCompute(workers=1, functions=functions, pinned_sha=PINNED_SHA).run_model([alabama.path, other.path], PERIOD)
    assert run.env_id == model.env_id() and run.library_versions["policyengine-us"] == "2.68.0"
    assert [area["path"] for area in run.areas] == [str(alabama.path), str(other.path)]
    for fixture, area in zip((alabama, other), run.areas):
        assert area.get("error") is None and area["persons"] == pytest.approx(fixture.persons)
    assert run.areas[1]["eitc"] == pytest.approx(20.0 * 6960)
    assert run.ran_on == ["modal im-usdata123 ta-" + run.ran_on[0].split(" ta-")[1]]
    assert run.ran_on[0].endswith("(us-east-1)")


def test_a_model_image_of_another_lock_refuses_and_the_files_fan_out(tmp_path, monkeypatch):
    files = [write_area(tmp_path / f"{code}.h5").path for code in ("AL", "AK", "AZ")]
    stale = SimpleNamespace(model_remote=FakeModalFunction(model_container("0" * 64), monkeypatch))
    with pytest.raises(RuntimeError, match="this model image is built from the lock with sha256 0{64}, the run's lock has"):
        ModalCompute(workers=1, functions=stale).run_model(files[:1], PERIOD)
    seen = []

    def answer(files, period, lock_sha256):  # what a container answers, without the model
        seen.append(sorted(Path(name).name for name in files))
        lines = [{"kind": "ready", "import_seconds": 1.0, "library_versions": {"policyengine-us": "2.68.0"}}]
        lines += [{"kind": "area", "path": name, "persons": float(len(data))} for name, data in files.items()]
        return {"lines": lines, "interpreter": model_environment.interpreter(sys.executable).model_dump(),
                "image_id": "im-1", "task_id": "ta-1", "region": "us-east-1"}

    functions = SimpleNamespace(model_remote=FakeModalFunction(answer, monkeypatch))
    run = ModalCompute(workers=2, functions=functions).run_model(files, PERIOD)
    assert seen == [["AL.h5", "AZ.h5"], ["AK.h5"]] and len(run.ran_on) == 2
    assert [area["persons"] for area in run.areas] == [float(path.stat().st_size) for path in files]


def test_the_deploy_entry_point_defines_the_app():
    assert modal_app.app.name == "usdata-pipeline"
    assert modal_app.GPU == os.environ.get("PIPELINE_MODAL_GPU", "A100")
    assert callable(modal_app.fit_remote.remote) and callable(modal_app.build_areas_remote.map)
    assert modal_model_app.app.name == "usdata-pipeline-model" and callable(modal_model_app.model_remote.map)


def test_release_job_on_modal_records_each_remote_environment(tmp_path, monkeypatch):
    """The whole job with the compute resource set to Modal: the fits go to the configured GPU, the
    areas fan out to `workers` containers, and the metadata carries the remotes' environments."""
    import modal
    from dagster import AssetKey, AssetRecordsFilter, instance_for_test

    from pipeline_assets import defs
    from pipeline_assets.driver import start_run
    from pipeline_assets.jobs import job_run_config
    from pipeline_assets.partitions import RUN_IDS
    from pipeline_assets.steps.config import config_for_scale
    from resources.git import CodeState
    from resources.run_store import LocalRunStore

    functions = fake_functions(monkeypatch)
    monkeypatch.setattr(modal.Function, "from_name", staticmethod(lambda app, name: getattr(functions, name)))
    store = LocalRunStore(tmp_path / "store")
    run_id = start_run(store, config_for_scale("tiny"), CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)).run_id
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [run_id])
        result = defs.resolve_job_def("release").execute_in_process(
            partition_key=run_id, instance=instance,
            run_config=job_run_config(store, PINNED_SHA, {"backend": "modal", "workers": 3, "gpu": "H100"}),
        )
        assert result.success

        def metadata(key):
            records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[run_id]), limit=1).records
            return {name: value.value for name, value in records[0].asset_materialization.metadata.items()}

        for fit in ("state_weights", "national_weights"):
            assert metadata(AssetKey(fit))["compute_pool"] == "modal-gpu-H100"
            assert metadata(AssetKey(fit))["runtime_environment"]["instance_id"].startswith("ta-")
        area = metadata(AssetKey(["districts", "AL_01"]))
        assert area["remote_calls"] == 3 and area["cloud_region"] == "us-east-1"
        assert area["container_image_digest"] == "im-usdata123"
        assert metadata(AssetKey("policy_data_db"))["compute_pool"] == "local"  # the other steps run here
    assert functions.fit_remote.log.options == [{"gpu": "H100"}, {"gpu": "H100"}]
    assert {args[2] for args in functions.fit_remote.log.remote} == {PINNED_SHA}
    (calls,) = functions.build_areas_remote.log.map
    assert len(calls) == 3 and {sha for _, _, sha in calls} == {PINNED_SHA}
