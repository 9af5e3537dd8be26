"""The checks ``diffusion check-params`` adds to the pydantic model: every value a stage would
reject at run time is rejected here first, before DVC deletes any output.

Beyond :func:`pipeline.config.load_params` this builds (without allocating weights: on the
``meta`` device) the U-Net, the noise process and the training configuration the train stage
would build, and checks the settings that depend on the machine: an image
folder must exist and fit the other settings (its size, whether it has classes), the Inception
extractor needs its weights on disk (found now, not after training).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Params, ParamsError
from pipeline.dataset import dataset_info
from pipeline.dataset_facts import FOLDER, dataset_errors


def check_buildable(params: Params) -> None:
    """Raise :class:`ParamsError` (one line) if a stage would refuse ``params`` at run time."""
    import torch

    from diffusion_core.processes import make_process
    from pipeline.train import build_unet, train_config

    if params.data.dataset == FOLDER:  # the registered datasets were checked at validation
        errors = dataset_errors(params, dataset_info(params))
        if errors:
            raise ParamsError(errors[0])
    _check_inception(params)
    try:
        with torch.device("meta"):
            build_unet(params)  # raises ParamsError("model: ...")
    except (RuntimeError, OverflowError, MemoryError) as exc:  # sizes no tensor can have
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParamsError(f"model: the U-Net cannot be built: {first}") from None
    try:
        process = make_process(params.process.name, **params.process.factory_kwargs())
    except (ValueError, TypeError) as exc:
        raise ParamsError(f"process: {exc}") from None
    try:
        train_config(params)  # TrainConfig's own checks
    except ValueError as exc:
        raise ParamsError(f"train: {exc}") from None
    for name, method in params.methods.items():
        _check_method(name, method, process)


def _check_method(name: str, method: Any, process: Any) -> None:
    """What the sample stage would skip (``samplers.compatible``: a step count the process or
    the sampler cannot take; the sampler's own minimum was refused at validation by the same
    registry rule) or refuse (a time grid the process cannot space), one line."""
    from diffusion_core.samplers import compatible, sampling_grid

    steps = getattr(method, "steps", None)
    reason = compatible(method.sampler, process, steps)
    if reason is not None:
        raise ParamsError(f"methods.{name}: {reason} (got steps={steps})")
    spacing = getattr(method, "spacing", None)
    try:
        sampling_grid(process, method.sampler, steps or 2, spacing)
    except ValueError as exc:
        raise ParamsError(f"methods.{name}.spacing: {exc} (got {spacing!r})") from None


def _check_inception(params: Params) -> None:
    """``evaluate.extractor: inception`` needs clean-fid's weights; say where before training."""
    if params.evaluate.extractor != "inception":
        return
    from diffusion_core.inception import INCEPTION_URL, inception_weights_path

    path = inception_weights_path()
    if not path.is_file():
        raise ParamsError(
            f"evaluate.extractor: inception needs clean-fid's weights at {path}; download "
            f"{INCEPTION_URL} there (got 'inception')"
        )
