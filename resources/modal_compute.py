"""Compute on Modal: the same step functions as the local pool, run by the deployed `usdata-pipeline` app.

The orchestrator (this process) sends input files as bytes with the run's pinned SHA, and writes
every returned file into the run store itself; the remote never touches the store. Each remote
call's runtime environment is kept in `last_environments` for the step's metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

from resources.compute import stripes
from resources.files import write_bytes_atomic
from resources.git import running_code_sha
from resources.model_environment import Interpreter, ModelEnvironment, ModelRun, RunnerAnswer, env_id_of, model_run
from resources.runtime import RuntimeEnvironment

APP_NAME = "usdata-pipeline"
MODEL_APP_NAME = "usdata-pipeline-model"  # pipeline_assets/modal_model_app.py: the model's own image
MODEL_FUNCTION_NAME = "model_remote"
# The input files of the area builds, named as load_area_inputs' parameters (in its order).
AREA_INPUTS = ("dataset", "package", "local_weights", "national_weights")
# The step functions the deployed app runs (pipeline_assets/modal_app.py), by name: each one's remote,
# and for a mapped task the loader its remote loads the inputs with. The steps' code is the image's.
FIT_REMOTE = {"fit_weights": "fit_remote"}
AREAS_REMOTE = {("build_area_h5", "load_area_inputs"): "build_areas_remote"}


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

    def map_with_inputs(self, task: Callable, items: Iterable, loader: Callable, loader_args: tuple, out_root: Path) -> list:
        """Build the areas (items with a code and a relpath) on `workers` remote containers; each loads
        the inputs once per chunk. The remote's results come back as the step's own objects."""
        remote = AREAS_REMOTE.get((task.__name__, loader.__name__))
        if remote is None:
            raise ValueError(f"the Modal app maps {' and '.join(t for t, _ in AREAS_REMOTE)} over "
                             f"{' and '.join(lo for _, lo in AREAS_REMOTE)} only, not {task.__name__} over {loader.__name__}")
        areas = list(items)
        if not areas:
            return []
        inputs = {name: Path(path).read_bytes() for name, path in zip(AREA_INPUTS, loader_args, strict=True)}
        chunks = stripes([area.code for area in areas], self.workers)
        replies = self._function(remote).map([inputs] * len(chunks), chunks, [self._sha()] * len(chunks))
        by_code = {area.code: area for area in areas}
        results = {}
        environments = []
        for reply in replies:
            environments.append(RuntimeEnvironment.model_validate(reply[0]["environment"]))
            for entry in reply:
                result = entry["result"]
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

    def iter_with_inputs(self, *args) -> Iterator:
        """map_with_inputs as an iterator: the remote replies are checked together, then reported."""
        return iter(self.map_with_inputs(*args))

    def fit(self, fit_weights: Callable, package_path: Path, weights_path: Path, log_path: Path, config):
        """Run the fit step function `fit_weights` on a remote `gpu`; write the weights and calibration log here."""
        remote = FIT_REMOTE.get(fit_weights.__name__)
        if remote is None:
            raise ValueError(f"the Modal app fits with {' and '.join(FIT_REMOTE)} only, not {fit_weights.__name__}")
        fit_remote = self._function(remote).with_options(gpu=self.gpu)
        reply = fit_remote.remote(Path(package_path).read_bytes(), config.model_dump_json(), self._sha())
        outputs = {"weights": Path(weights_path), "calibration_log": Path(log_path)}
        for name, path in outputs.items():
            write_bytes_atomic(path, reply["files"][name])
        self.last_environments = [RuntimeEnvironment.model_validate(reply["environment"])]
        return reply["result"].model_copy(update={"outputs": outputs})  # the step's result, with the files as written here

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
        return model_run(env_id_of(lock_sha256, interpreters.pop()), period, [str(path) for path in paths], chunks, [
            RunnerAnswer(lines=reply["lines"], ran_on=f"modal {reply['image_id']} {reply['task_id']} ({reply['region']})",
                         died="no result came back")
            for reply in replies
        ])
