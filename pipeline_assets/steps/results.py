"""What every step returns: the files it wrote and its own figures."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StepResult(BaseModel):
    """Output paths (by role) and the step's figures; figures are plain numbers so they plot."""

    model_config = ConfigDict(frozen=True)

    outputs: dict[str, Path]
    figures: dict[str, float | int] = Field(default_factory=dict)
    # The run whose output this step took instead of computing it (None: computed here).
    reused_from: str | None = None
    # What the step ran beyond its own process, for its record's environment (MODEL_PACKAGE: the
    # simulation model it ran, in an environment of the model's own).
    environment: dict[str, dict] = Field(default_factory=dict)


MODEL_PACKAGE = "model_package"
