"""The checks ``diffusion check-params`` adds to the pydantic model: every value a stage would
reject at run time is rejected here first, before DVC deletes any output.

Beyond :func:`pipeline.config.load_params` this builds (without allocating weights: on the
``meta`` device) the U-Net, the noise process and the training configuration the train stage
would build, and checks the settings that depend on the machine (``bf16`` needs CUDA).
"""

from __future__ import annotations

import contextlib

from pipeline.config import Params, ParamsError


def check_buildable(params: Params) -> None:
    """Raise :class:`ParamsError` (one line) if a stage would refuse ``params`` at run time."""
    import torch

    from diffusion_core.processes import make_process
    from diffusion_core.training import TrainConfig
    from pipeline.train import build_unet, train_config

    try:
        with torch.device("meta"):
            build_unet(params)  # raises ParamsError("model: ...")
    except (RuntimeError, OverflowError, MemoryError) as exc:  # sizes no tensor can have
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParamsError(f"model: the U-Net cannot be built: {first}") from None
    try:
        make_process(params.process.name, **params.process.factory_kwargs())
    except (ValueError, TypeError) as exc:
        raise ParamsError(f"process: {exc}") from None
    try:
        cfg: TrainConfig = train_config(params)
    except ValueError as exc:
        raise ParamsError(f"train: {exc}") from None
    if cfg.mixed_precision == "bf16":
        cuda = False
        with contextlib.suppress(Exception):
            cuda = torch.cuda.is_available()
        if not cuda:
            raise ParamsError(
                "train.mixed_precision: bf16 needs CUDA and there is none; use auto or no "
                "(got 'bf16')"
            )
