"""Commands ``encode`` and ``decode``: DDIM inversion of images to latents and back.

The eta = 0 DDIM update is a discretisation of the probability-flow ODE, so running it forwards
in time maps an image ``x_0`` to a latent ``x_T`` and running it backwards maps ``x_T`` back
(Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Sec. 5.4). Both use the time
grid of a ``ddim`` method in ``params.yaml`` (its ``steps`` and ``spacing``; ``eta`` is taken as
0) and, for a class-conditional model, the images' labels. The round trip is exact only as the
number of steps grows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusion_core.checkpoint import load_checkpoint, save_atomic
from diffusion_core.data import from_uint8, to_uint8
from diffusion_core.distributed import default_device
from diffusion_core.samplers import ddim, ddim_invert
from pipeline import paths
from pipeline.config import Method, Params, ParamsError
from pipeline.errors import StageError
from pipeline.files import file_digest, provenance, write_bytes
from pipeline.image_grid import grid_png
from pipeline.prepare import load_split
from pipeline.sampling import load_model


def _ddim_method(params: Params, name: str) -> Method:
    method = params.method(name)
    if method.sampler != "ddim":
        raise ParamsError(
            f"methods.{name}.sampler: encode/decode need a ddim method (got {method.sampler!r})"
        )
    return method


def _images(source: Path | None, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``count`` images (float, [-1, 1]) and labels of ``source``: a split written by
    ``prepare`` or a ``samples.pt``; default the test split."""
    if source is None:
        images, labels = load_split(paths.TEST_DATA)
    else:
        obj = load_checkpoint(source, map_location="cpu")
        images, labels = obj["images"], obj.get("labels")
        if images.dtype == torch.uint8:
            images = from_uint8(images)
    if count < 1:
        raise StageError(f"--count must be >= 1 (got {count})")
    return images[:count], None if labels is None else labels[:count]


def encode(
    params: Params, method: str, out: Path, source: Path | None = None, count: int = 16
) -> dict[str, Any]:
    """Invert ``count`` images into latents ``x_T``; writes ``out`` (``{"latents", ...}``)."""
    m = _ddim_method(params, method)
    device = default_device()
    denoiser, process, _ = load_model(device)
    images, labels = _images(source, count)
    conditional = int(getattr(denoiser.net, "num_classes", 0)) > 0
    labels = labels.to(device) if conditional and labels is not None else None
    grid = process.time_grid(m.steps, m.spacing, device="cpu")
    with torch.no_grad():
        result = ddim_invert(denoiser, process, images.to(device), grid, labels=labels)
    record = {
        "latents": result.x.cpu(),
        "labels": None if labels is None else labels.cpu(),
        "images": to_uint8(images),
        "method": method,
        "steps": m.steps,
        "spacing": m.spacing,
        "nfe": result.nfe,
        "model_sha256": file_digest(paths.MODEL),
        "provenance": provenance(params),
    }
    save_atomic(record, out)
    print(f"encoded {images.shape[0]} images into {out} with {result.nfe} denoiser evaluations")
    return record


def decode(params: Params, latents: Path, out: Path) -> dict[str, Any]:
    """Run DDIM (eta = 0) from the latents in ``latents``; writes ``out`` and ``out``.png.

    Prints the mean squared error to the encoded images (on the [-1, 1] scale, after 8-bit
    quantisation) when ``latents`` holds them.
    """
    try:
        enc = load_checkpoint(latents, map_location="cpu")
    except FileNotFoundError:
        raise StageError(f"{latents} is missing: run `diffusion encode` first") from None
    method = enc["method"]
    m = _ddim_method(params, method)
    device = default_device()
    denoiser, process, _ = load_model(device)
    grid = process.time_grid(int(enc["steps"]), enc["spacing"], device="cpu")
    labels = enc.get("labels")
    with torch.no_grad():
        result = ddim(
            denoiser,
            process,
            enc["latents"].to(device),
            grid,
            labels=None if labels is None else labels.to(device),
            eta=0.0,
        )
    images = to_uint8(result.x.cpu())
    record: dict[str, Any] = {"images": images, "labels": labels, "method": method}
    if enc.get("images") is not None:
        mse = float((from_uint8(images) - from_uint8(enc["images"])).pow(2).mean())
        record["mse"] = mse
        print(f"round-trip mean squared error {mse:.5f} ({m.steps} steps)")
    save_atomic(record, out)
    write_bytes(Path(out).with_suffix(".png"), grid_png(images))
    print(f"decoded {images.shape[0]} images into {out}")
    return record
