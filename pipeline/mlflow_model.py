"""The trained network as an MLflow Model: a pyfunc whose ``predict`` generates images.

Input, one row per image (a pandas DataFrame):

* ``seed`` (long, required): image ``i`` draws its prior sample and all its noise from ``seed``,
  so the same seed gives the same image whatever else is in the batch;
* ``label`` (long, optional): the class to generate; ``-1`` (or a missing column) is the null
  label, i.e. the unconditional model.

Params (MLflow inference params, all optional): ``sampler`` (``ddim``; any name of
``diffusion_core.samplers.SAMPLERS``), ``steps`` (50), ``guidance`` (classifier-free guidance
weight ``w``, 0), ``autoguidance`` (its weight against the model's ``train.guide_at``
snapshot, 0), ``spacing`` (empty: the sampler's own), ``clip_x0`` (false), ``settings`` (the sampler's own
settings as a JSON object, e.g. ``{"eta": 0.5}``; empty: none), ``device`` (``auto``: CUDA when
present).

Output: ``uint8`` images of shape ``(N, C, H, W)``. They are sampled through
:mod:`pipeline.sampling`, as the sample stage and ``diffusion generate`` sample: a method's
settings as params and its seeds and labels as rows give the sample stage's images.

Logged from code (``pipeline/mlflow_pyfunc_entry.py``), not pickled: loading the model runs this
project's installed code on the checkpoint artifact, which is read with ``weights_only=True``::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/diffusion-digits/1")
    images = model.predict(pd.DataFrame({"seed": range(8), "label": [3] * 8}),
                           params={"sampler": "ddim", "steps": 20, "guidance": 1.0})
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from diffusion_core.distributed import default_device
from pipeline.errors import StageError
from pipeline.sampling import Model, Recipe, guided_denoiser, load_model, sample_images

# MLflow asks for type hints on ``predict``; its validation does not fit a DataFrame + params API
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method")

ENTRY = Path(__file__).with_name("mlflow_pyfunc_entry.py")
PIP_REQUIREMENTS = ["diffusion-toolkit", "torch", "numpy", "pandas", "mlflow"]


class DiffusionSampler(mlflow.pyfunc.PythonModel):
    """Generates images from a ``runs/train/model.pt`` checkpoint (artifact ``checkpoint``)."""

    def load_context(self, context: Any) -> None:
        self.checkpoint = Path(context.artifacts["checkpoint"])
        self._loaded: dict[str, Any] = {}

    def _model(self, device: torch.device) -> Model:
        if device.type not in self._loaded:
            self._loaded[device.type] = load_model(device, self.checkpoint)
        return self._loaded[device.type]

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads hints)
        p = {**DEFAULTS, **(params or {})}
        device = default_device() if p["device"] == "auto" else torch.device(p["device"])
        model = self._model(device)
        labels = _labels(model_input, model.num_classes)
        recipe = _recipe(p)
        if recipe.guidance > 0 and labels is None:
            raise ValueError("guidance needs a class-conditional model and labels")
        try:
            guided = guided_denoiser(model, recipe, device)
        except StageError as exc:  # a model without a guide snapshot
            raise ValueError(str(exc)) from None
        seeds = [int(s) for s in model_input["seed"]]
        out = sample_images(model, guided, recipe, seeds=seeds, labels=labels, device=device)
        return out.images.numpy()


#: the inference params: MLflow type and default (:func:`signature` declares them)
PARAMS: dict[str, tuple[str, Any]] = {
    "sampler": ("string", "ddim"),
    "steps": ("long", 50),
    "guidance": ("double", 0.0),
    "autoguidance": ("double", 0.0),
    "spacing": ("string", ""),  # "": the sampler's own (docs/samplers.md)
    "clip_x0": ("boolean", False),
    "settings": ("string", ""),
    "device": ("string", "auto"),
}
DEFAULTS: dict[str, Any] = {name: default for name, (_, default) in PARAMS.items()}


def _recipe(p: dict[str, Any]) -> Recipe:
    """The :class:`~pipeline.sampling.Recipe` of the inference params."""
    try:
        settings = json.loads(p["settings"]) if str(p["settings"]).strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"settings: expected a JSON object such as {{'eta': 0.5}}: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"settings: expected a JSON object (got {p['settings']!r})")
    return Recipe(str(p["sampler"]), steps=int(p["steps"]), spacing=str(p["spacing"]) or None,
                  guidance=float(p["guidance"]), autoguidance=float(p["autoguidance"]),
                  clip_x0=bool(p["clip_x0"]), settings=settings)


def _labels(model_input: Any, num_classes: int) -> torch.Tensor | None:
    """The ``label`` column as int64 labels (-1 or missing: the null label ``num_classes``);
    None for an unconditional model or no column."""
    if num_classes > 0 and "label" in model_input:
        raw = np.asarray(model_input["label"], dtype=np.float64)
        raw = np.where(np.isnan(raw) | (raw < 0), num_classes, raw)  # null label
        if (raw > num_classes).any():
            raise ValueError(f"label must be in 0..{num_classes - 1} or -1")
        return torch.as_tensor(raw, dtype=torch.int64)
    if "label" in model_input and (np.asarray(model_input["label"]) >= 0).any():
        raise ValueError("this model is unconditional: leave out `label` or use -1")
    return None


def signature(channels: int, size: int) -> Any:
    """Input columns, inference params and output tensor of :class:`DiffusionSampler`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", "seed"), ColSpec("long", "label", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
        params=ParamSchema([ParamSpec(name, kind, default)
                            for name, (kind, default) in PARAMS.items()]),
    )


def log_pyfunc(uri: str, run_id: str, model_file: Path, registered_name: str | None) -> str | None:
    """Log ``model_file`` as the pyfunc ``model`` of run ``run_id`` in the store ``uri``;
    register it as ``registered_name`` when given. Returns the registered version or None."""
    from diffusion_core.checkpoint import load_checkpoint

    config = load_checkpoint(model_file, map_location="cpu")["model_config"]
    channels, size = int(config["in_channels"]), int(config["image_size"])
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # the fluent API needs a global tracking URI; MLflow mirrors it into the environment, so
    # put the caller's $MLFLOW_TRACKING_URI back afterwards
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(ENTRY),
                artifacts={"checkpoint": str(model_file)},
                signature=signature(channels, size),
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=registered_name,
            )
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
    version = getattr(info, "registered_model_version", None)
    return None if version is None else str(version)
