"""The identity contract, written once: which fields make env_id and which make config_hash.

env_id names the software environment (what could change results for the same code and config);
config_hash names the run configuration. Labels and resource sizes change neither: they change how
fast or how a run is described, not what it computes.
"""

from __future__ import annotations

import hashlib
import json

from pipeline_assets.steps.config import RunConfig
from resources.runtime import RuntimeEnvironment

# Libraries whose versions can change results (numerics, random streams, model fitting, file bytes).
NONDETERMINISM_LIBRARIES = ("numpy", "scipy", "scikit-learn", "quantile-forest", "torch", "l0-python", "h5py")

# env_id = hash of these, plus the image digest or (outside a container) the installed distributions.
ENV_ID_FIELDS = ("python_version", "python_implementation", "architecture")

# Never hashed into config_hash: labels (the scale name is one), the reuse switch, and resource
# sizes (dotted paths): none of them changes what a run computes.
CONFIG_EXCLUDED_FIELDS = frozenset({"scale", "labels", "reuse", "areas.workers", "local_fit.threads", "national_fit.threads"})


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def env_identity(env: RuntimeEnvironment) -> dict:
    """The fields env_id hashes, in the clear (so two environments can be compared field by field)."""
    identity = {field: getattr(env, field) for field in ENV_ID_FIELDS}
    identity["libraries"] = {name: env.library_versions.get(name) for name in NONDETERMINISM_LIBRARIES}
    if env.container_image_digest:
        identity["container_image_digest"] = env.container_image_digest
    else:
        identity["installed_distributions_sha256"] = env.installed_distributions_sha256
    return identity


def env_id(env: RuntimeEnvironment) -> str:
    return _digest(env_identity(env))


def _without(payload: dict, excluded: frozenset[str], prefix: str = "") -> dict:
    out = {}
    for key, value in payload.items():
        path = f"{prefix}{key}"
        if path in excluded:
            continue
        out[key] = _without(value, excluded, f"{path}.") if isinstance(value, dict) else value
    return out


def hashed_config(config: RunConfig) -> dict:
    """The configuration config_hash covers: everything but labels and resource sizes."""
    return _without(config.model_dump(mode="json"), CONFIG_EXCLUDED_FIELDS)


def config_hash(config: RunConfig) -> str:
    return _digest(hashed_config(config))


def step_config_hash(section: dict) -> str:
    """Hash of one step's slice of the hashed configuration (the step-reuse key's config part)."""
    return _digest(section)
