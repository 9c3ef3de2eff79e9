"""Compute on Modal: the same step functions as the local pool, run by the deployed `usdata-pipeline` app.

The orchestrator (this process) sends input files as bytes with the run's pinned SHA, and writes
every returned file into the run store itself; the remote never touches the store. Each remote
call's runtime environment is kept in `last_environments` for the step's metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

from pipeline_assets.steps.config import FitConfig
from pipeline_assets.steps.geography import Area
from pipeline_assets.steps.local_areas import AreaResult, build_area_h5, load_area_inputs
from pipeline_assets.steps.results import StepResult
from resources.compute import stripes
from resources.files import write_bytes_atomic
from resources.git import running_code_sha
from resources.model_environment import AreaResult as ModelAreaResult
from resources.model_environment import Interpreter, ModelEnvironment, ModelRun, env_id_of
from resources.runtime import RuntimeEnvironment

APP_NAME = "usdata-pipeline"
MODEL_APP_NAME = "usdata-pipeline-model"  # pipeline_assets/modal_model_app.py: the model's own image
MODEL_FUNCTION_NAME = "model_remote"
# The input files of the area builds, named as load_area_inputs' parameters (in its order).
AREA_INPUTS = ("dataset", "package", "local_weights", "national_weights")


class ModalCompute:
    """The Modal implementation of the compute resource.

    `functions` holds the remote function handles (attributes `fit_remote`, `build_areas_remote` and
    `model_remote`, each with `.remote`, `.map` and `.with_options` like modal.Function); by default they
    are looked up from the deployed apps on first use. `pinned_sha` defaults to the SHA of the code this
    process runs.
    """

    def __init__(
        self,
        workers: int = 50,
        gpu: str = "A100",
        app_name: str = APP_NAME,
        functions=None,
        pinned_sha: str | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.gpu = gpu
        self.app_name = app_name
        self.functions = functions
        self.pinned_sha = pinned_sha
        self.last_environments: list[RuntimeEnvironment] = []

    def _function(self, name: str):
        """The remote function `name`, looked up in its deployed app on first use (the model's app is
        deployed apart from the pipeline's, so a run that checks no area never needs it)."""
        if self.functions is None:
            self.functions = SimpleNamespace()
        if not hasattr(self.functions, name):
            import modal

            app = MODEL_APP_NAME if name == MODEL_FUNCTION_NAME else self.app_name
            setattr(self.functions, name, modal.Function.from_name(app, name))
        return getattr(self.functions, name)

    def _sha(self) -> str:
        if self.pinned_sha is None:
            self.pinned_sha = running_code_sha()
        return self.pinned_sha

    def map_with_inputs(self, task, items: Iterable[Area], loader, loader_args: tuple, out_root: Path) -> list[AreaResult]:
        """Build the areas on `workers` remote containers; each loads the inputs once per chunk."""
        if task is not build_area_h5 or loader is not load_area_inputs:
            raise ValueError("the Modal app builds areas with build_area_h5 over load_area_inputs only")
        areas = list(items)
        if not areas:
            return []
        inputs = {name: Path(path).read_bytes() for name, path in zip(AREA_INPUTS, loader_args, strict=True)}
        chunks = stripes([area.code for area in areas], self.workers)
        replies = self._function("build_areas_remote").map(
            [inputs] * len(chunks), chunks, [self._sha()] * len(chunks)
        )
        by_code = {area.code: area for area in areas}
        results: dict[str, AreaResult] = {}
        environments = []
        for reply in replies:
            environments.append(RuntimeEnvironment.model_validate(reply[0]["environment"]))
            for entry in reply:
                result = AreaResult.model_validate(entry["result"])
                area = by_code.get(result.area)
                if area is None or entry["relpath"] != area.relpath or result.relpath != area.relpath:
                    raise RuntimeError(f"the remote returned {entry['relpath']!r}, which was not asked for")
                digest = hashlib.sha256(entry["data"]).hexdigest()
                if digest != result.sha256:
                    raise RuntimeError(f"{area.relpath}: received bytes hash to {digest}, the remote computed {result.sha256}")
                write_bytes_atomic(Path(out_root) / area.relpath, entry["data"])
                results[area.code] = result
        missing = [code for code in by_code if code not in results]
        if missing:
            raise RuntimeError(f"the remote returned no file for areas {missing}")
        self.last_environments = environments
        return [results[area.code] for area in areas]

    def iter_with_inputs(self, *args) -> Iterator[AreaResult]:
        """map_with_inputs as an iterator: the remote replies are checked together, then reported."""
        return iter(self.map_with_inputs(*args))

    def fit(self, package_path: Path, weights_path: Path, log_path: Path, config: FitConfig) -> StepResult:
        """Fit weights on a remote `gpu`; write the weights and calibration log here."""
        fit_remote = self._function("fit_remote").with_options(gpu=self.gpu)
        reply = fit_remote.remote(Path(package_path).read_bytes(), config.model_dump_json(), self._sha())
        write_bytes_atomic(weights_path, reply["weights"])
        write_bytes_atomic(log_path, reply["calibration_log"])
        self.last_environments = [RuntimeEnvironment.model_validate(reply["environment"])]
        return StepResult(
            outputs={"weights": Path(weights_path), "calibration_log": Path(log_path)}, figures=reply["figures"]
        )

    def run_model(self, paths: list[Path], period: int) -> ModelRun:
        """PolicyEngine-US on the area files in `workers` containers of the model's image, each sent its
        files' bytes and the sha256 of this checkout's lock (an image built from another lock refuses)."""
        environment = ModelEnvironment()
        lock_sha256 = environment.lock_sha256()
        chunks = stripes([str(path) for path in paths], self.workers)
        replies = list(self._function(MODEL_FUNCTION_NAME).map(
            [{path: Path(path).read_bytes() for path in chunk} for chunk in chunks], [period] * len(chunks),
            [lock_sha256] * len(chunks),
        ))
        interpreters = {Interpreter.model_validate(reply["interpreter"]) for reply in replies}
        if len(interpreters) != 1:
            raise RuntimeError(f"the model's containers ran on different interpreters: {sorted(map(str, interpreters))}")
        readies = [next(line for line in reply["lines"] if line["kind"] == "ready") for reply in replies]
        results = {line["path"]: ModelAreaResult.model_validate(line)
                   for reply in replies for line in reply["lines"] if line["kind"] == "area"}
        unasked = sorted(set(results) - {str(path) for path in paths})
        if unasked:
            raise RuntimeError(f"the model's containers returned areas that were not asked for: {unasked}")
        return ModelRun(
            env_id=env_id_of(lock_sha256, interpreters.pop()), period=period,
            import_seconds=max(ready["import_seconds"] for ready in readies),
            library_versions=readies[0]["library_versions"],
            areas=[results.get(str(path)) or ModelAreaResult(path=str(path), error=f"{path}: no result came back")
                   for path in paths],
            ran_on=[f"modal {reply['image_id']} {reply['task_id']} ({reply['region']})" for reply in replies],
        )
