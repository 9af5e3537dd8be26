"""Stage ``sample --method M``: draw ``sample.n_images`` images from the EMA weights with method M.

Image ``i`` starts from seed ``seed + i`` (its prior draw and all its noise), so it is the same
for any ``sample.batch_size``, and every method sees the same seeds. A class-conditional model
samples the labels ``classes[i % len(classes)]`` (every class in turn when ``classes`` is null),
with classifier-free guidance (Ho & Salimans 2022) when ``guidance > 0``. ``autoguidance > 0``
guides any model with the weak snapshot that ``train.guide_at`` keeps in the model file
(Karras et al. 2024); both together: classifier-free guidance of the autoguided denoiser. A
method with ``unconditional: true`` samples the same network with ``labels=None``, which the U-Net maps to
its null label (the unconditional model that label dropout trained); it stores no labels.

Under ``torchrun`` (``sample.nproc`` processes in ``dvc.yaml``) rank ``r`` of ``W`` draws images
``r, r + W, r + 2W, ...`` and rank 0 gathers them (:mod:`pipeline.shards`) and writes the files: the
samples and the grid are those of one process, bit for bit. A method with ``student: k`` samples
the distilled student ``runs/distill/student_<k>.pt`` (:mod:`pipeline.distill`) instead of
``runs/train/model.pt``. The model is loaded and sampled through
:mod:`pipeline.sampling`, the path ``diffusion generate`` and the MLflow model take too: the same
method and seeds give the same images there.

Writes ``runs/samples/M/samples.pt`` (uint8 images, labels, seeds), ``reports/grids/M.png`` and
``metrics/sample/M.json``: ``nfe`` counts network evaluations per image (the sampler's denoiser
calls times :func:`~diffusion_core.guidance.network_evaluations`: 2 for classifier-free guidance,
whose batch is doubled, and for autoguidance, which runs two networks), ``denoiser_calls`` the
sampler's steps. A sampler that does not fit the trained process is not an error: the
metrics record says ``status: skipped`` with the reason, and the grid shows it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_core.checkpoint import save_atomic
from diffusion_core.distributed import DistInfo, barrier, cleanup, setup_distributed
from diffusion_core.guidance import network_evaluations
from diffusion_core.samplers import compatible
from pipeline import paths
from pipeline.config import Method, Params
from pipeline.errors import StageError
from pipeline.files import file_digest, write_bytes, write_json, write_provenance, write_timing
from pipeline.image_grid import grid_png, png_bytes
from pipeline.sampling import Recipe, guided_denoiser, load_model, method_labels
from pipeline.shards import draw, gather, share

GRID_IMAGES = 100


def _message_png(text: str) -> bytes:
    """A small image saying ``text`` (the grid of a skipped method)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (480, 60), color=255)
    ImageDraw.Draw(img).multiline_text((8, 8), _wrap(text, 70), fill=0)
    return png_bytes(img)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def model_path(m: Method) -> Path:
    """The model file a method samples: ``runs/train/model.pt``, or the distilled student of
    ``m.student`` steps (``runs/distill/student_<k>.pt``)."""
    return paths.MODEL if m.student is None else paths.student_path(m.student)


def _skip(params: Params, name: str, method: Method, reason: str) -> dict[str, Any]:
    print(f"skipped {name}: {reason}")
    record = {"status": "skipped", "reason": reason}
    write_json(paths.samples_dir(name) / "skipped.json", record)
    write_bytes(paths.grid_path(name), _message_png(f"{name}: skipped. {reason}"))
    write_json(paths.sample_metrics(name), record)
    write_provenance(f"sample@{name}", params, method=name, settings=method.model_dump(mode="json"))
    return record


def run(params: Params, method: str) -> dict[str, Any]:
    """Sample with one method; returns its metrics record (on every rank under ``torchrun``)."""
    m = params.method(method)
    try:
        dist = setup_distributed()
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"cannot start the process group: {exc}") from None
    try:
        if dist.world_size != params.sample.nproc and dist.is_main:
            print(f"note: sample.nproc={params.sample.nproc} but {dist.world_size} process(es) run")
        return _sample(params, method, m, dist)
    finally:
        cleanup()


def _sample(params: Params, method: str, m: Method, dist: DistInfo) -> dict[str, Any]:
    """Rank ``r`` of ``W`` draws images ``r, r + W, ...``; rank 0 gathers them and writes."""
    device = dist.device
    model = load_model(device, model_path(m))
    recipe = Recipe.of_method(m)
    reason = compatible(recipe.sampler, model.process, recipe.steps)
    if reason is not None:
        return _skip(params, method, m, reason) if dist.is_main else {"status": "skipped"}
    guided = guided_denoiser(model, recipe, device, option=f"methods.{method}.autoguidance")
    n, batch = params.sample.n_images, params.sample.batch_size
    seeds = [params.seed + i for i in range(n)]
    labels = method_labels(m, n, model.num_classes)
    start = time.perf_counter()
    mine = draw(model, guided, recipe, indices=share(n, dist.rank, dist.world_size),
                first_seed=params.seed, labels=labels, batch_size=batch, device=device,
                desc=method)
    wall_s = time.perf_counter() - start
    drawn = gather(mine, n)
    calls = float(drawn.nfe.double().mean())
    per_call = network_evaluations(guided, labelled=labels is not None)
    record = {"status": "ok", "nfe": calls * per_call, "denoiser_calls": calls, "n_images": n}
    if dist.is_main:
        _write(params, method, m, drawn.images, labels, seeds, record, model.file)
        images_per_s = n / wall_s if wall_s > 0 else None
        write_timing(f"sample@{method}", wall_s=round(wall_s, 3), images_per_s=images_per_s,
                     batch_size=batch, world_size=dist.world_size, device=device.type)
        print(f"{method}: {n} images in {wall_s:.1f} s, {record['nfe']:.0f} NFE per image")
    barrier()
    return record


def _write(params: Params, method: str, m: Method, images: Tensor, labels: Tensor | None,
           seeds: list[int], record: dict[str, Any], model_file: dict[str, Any]) -> None:
    """The samples file, the grid, the metrics record and the provenance of one method."""
    save_atomic(
        {"images": images, "labels": labels, "seeds": torch.tensor(seeds), "method": method},
        paths.samples_dir(method) / "samples.pt",
    )
    write_bytes(paths.grid_path(method), grid_png(images, GRID_IMAGES))
    write_json(paths.sample_metrics(method), record)
    write_provenance(
        f"sample@{method}",
        params,
        method=method,
        settings=m.model_dump(mode="json"),
        conditional=labels is not None,
        seeds={"first": seeds[0], "count": len(seeds)},
        process=model_file["process"],
        model=model_path(m).as_posix(),
        model_sha256=file_digest(model_path(m)),
    )
