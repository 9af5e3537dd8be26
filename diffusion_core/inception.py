"""clean-fid's standard Inception-v3 feature network (the TorchScript weights of Karras et al.,
mode "clean"): where its weights live, and the network itself. Its weights need a download;
offline, the evaluation classifier (:mod:`diffusion_core.feature_classifier`) stands in.
clean-fid is imported only when the network is built.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from diffusion_core.distributed import default_device

__all__ = ["INCEPTION_URL", "inception_extractor", "inception_weights_path"]

INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)


def inception_weights_path() -> Path:
    """Where clean-fid looks for (and downloads) its TorchScript Inception weights."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def inception_extractor(
    device: torch.device | str | None = None, *, download: bool = False, timeout_s: float = 60.0
) -> Callable[[Tensor], Tensor]:
    """clean-fid's standard Inception-v3 (mode "clean"), no DataParallel; use ``resize="clean"``.

    Raises a one-line RuntimeError when the weights are missing (and not downloadable).
    """
    device = torch.device(device) if device is not None else default_device()
    path = inception_weights_path()
    if not path.is_file():
        if not download:
            raise RuntimeError(
                f"clean-fid Inception weights missing: place {INCEPTION_URL} at {path} "
                "(or call with download=True where a network is available)"
            )
        from cleanfid.downloads_helper import check_download_inception

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            check_download_inception(fpath=str(path.parent))
        except Exception as exc:
            if path.is_file():
                os.remove(path)  # clean-fid writes in place; never leave a truncated file
            raise RuntimeError(
                f"could not download clean-fid Inception weights ({type(exc).__name__}); "
                f"place {INCEPTION_URL} at {path}"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    from cleanfid.features import build_feature_extractor

    return build_feature_extractor("clean", device=device, use_dataparallel=False)
