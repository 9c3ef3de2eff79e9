"""Code versions derived from the step modules' source files, so a step's version moves when its
code does. Read as bytes, not imported: learning the fit's version must not import torch."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path


def code_version(*module_names: str) -> str:
    digest = hashlib.sha256()
    for name in module_names:
        digest.update(Path(find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:12]
