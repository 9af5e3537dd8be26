"""``diffusion generate``: images from a trained model with any sampler, no params.yaml needed.

Image ``i`` (``0..n-1``) starts from seed ``seed + i`` and has label ``classes[i % len(classes)]``,
so it is the same whatever the batch size or the number of processes. Under ``torchrun`` rank
``r`` of ``W`` takes images ``r, r + W, r + 2W, ...`` (EDM's ``generate.py`` idea), writes their
PNGs itself, and rank 0 gathers the images for the ``.npz`` and the grid::

    diffusion generate --classes 3 -n 64 --sampler ddim --steps 20 --guidance 2 \\
        --out runs/generated/three
    python -m torch.distributed.run --standalone --nproc-per-node=4 -m pipeline generate -n 50000

Writes into ``--out``: ``{i:05d}_class{c}_seed{s}.png`` (``_uncond_`` for the null label) per
image, ``images.npz`` (``images`` as ``N, H, W, C`` uint8, ``labels`` (-1 = null label),
``seeds``), ``grid.png`` (the first 100) and ``generate.json`` (the resolved options, model and
timing). Every bad option is a :class:`OptionError` whose message is one line naming the option.

It loads and samples through :mod:`pipeline.sampling`, as the sample stage does: a method's
settings given as options (``--sampler``, ``--steps``, ``--spacing``, ``-w``, ``--autoguidance``,
``--clip-x0``, ``--set KEY=VALUE``) with ``--seed`` the params' ``seed`` and ``--classes`` its
classes give the sample stage's images, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import paths
from pipeline.errors import StageError


class OptionError(ValueError):
    """A bad command-line option (exit 2); the message is one line naming the option."""


@dataclass
class GenerateOptions:
    """Everything ``diffusion generate`` takes (see the command's help for each)."""

    model: str = str(paths.MODEL)
    out: Path = Path("runs/generated")
    sampler: str = "ddim"
    steps: int = 50
    spacing: str | None = None  # the sampler's own
    guidance: float = 0.0
    autoguidance: float = 0.0
    clip_x0: bool = False
    classes: str = "all"
    n: int = 64
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    settings: list[str] = field(default_factory=list)
    png: bool = True
    npz: bool = True


def image_name(index: int, label: int | None, seed: int) -> str:
    """``00012_class3_seed12.png``; ``00012_uncond_seed12.png`` for the null label."""
    middle = "uncond" if label is None else f"class{label}"
    return f"{index:05d}_{middle}_seed{seed}.png"


def resolve_model(spec: str) -> Path:
    """The checkpoint file of ``spec``: a path, or an MLflow model URI (``models:/name/version``,
    ``runs:/id/model``) whose pyfunc carries the checkpoint as its ``checkpoint`` artifact."""
    if ":/" not in spec:
        return Path(spec)
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(spec)
        return Path(model.unwrap_python_model().checkpoint)
    except Exception as exc:  # MLflow raises many kinds; one line is what the user needs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"--model {spec}: cannot load the MLflow model: {first}") from None


def parse_settings(sampler: str, items: list[str]) -> dict[str, Any]:
    """``["eta=0.5"]`` -> ``{"eta": 0.5}``, keys checked against the sampler's settings and
    values against the method model of ``pipeline.config`` where it has one."""
    import yaml

    from diffusion_core.samplers import SAMPLER_SETTINGS

    allowed = SAMPLER_SETTINGS[sampler]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--set: expected KEY=VALUE (got {item!r})")
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no settings"
            raise OptionError(f"--set {key}: {sampler} takes {takes} (got {item!r})")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise OptionError(f"--set {key}: cannot read the value (got {raw!r})") from None
    _check_values(sampler, out)
    return out


def _check_values(sampler: str, settings: dict[str, Any]) -> None:
    """Validate values with the params model's method of ``sampler`` (when it has one)."""
    from pydantic import TypeAdapter, ValidationError

    from pipeline.config import Method

    try:
        TypeAdapter(Method).validate_python({"sampler": sampler, "steps": 2, **settings})
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if str(p) != sampler]
            if loc and loc[0] in settings:
                raise OptionError(
                    f"--set {loc[0]}: {err['msg']} (got {settings[loc[0]]!r})"
                ) from None
        # anything else (e.g. a sampler the params model does not list yet) is not ours to judge


def parse_classes(spec: str, num_classes: int, n: int) -> list[int] | None:
    """The label of every image: ``all`` cycles every class, ``3`` or ``1,3,5`` cycle those,
    ``none`` samples the null label (unconditional). None when there are no labels."""
    text = spec.strip().lower()
    if text in ("none", "null", "uncond"):
        return None
    if num_classes == 0:
        if text == "all":
            return None
        raise OptionError(f"--classes: the model is unconditional; leave it out (got {spec!r})")
    if text == "all":
        chosen = list(range(num_classes))
    else:
        try:
            chosen = [int(c) for c in text.replace(" ", "").split(",") if c != ""]
        except ValueError:
            raise OptionError(
                f"--classes: expected all, none, a class or a comma-separated list (got {spec!r})"
            ) from None
        if not chosen:
            raise OptionError(f"--classes: no class given (got {spec!r})")
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise OptionError(
                f"--classes: labels must lie in 0..{num_classes - 1} (got {spec!r})"
            )
    return [chosen[i % len(chosen)] for i in range(n)]


def check_options(o: GenerateOptions) -> None:
    """The checks that need no model."""
    from diffusion_core.samplers import SAMPLERS

    if o.n < 1:
        raise OptionError(f"--num: must be at least 1 (got {o.n})")
    if o.batch_size < 1:
        raise OptionError(f"--batch-size: must be at least 1 (got {o.batch_size})")
    if o.steps < 1:
        raise OptionError(f"--steps: must be at least 1 (got {o.steps})")
    if o.seed < 0:
        raise OptionError(f"--seed: must be 0 or more (got {o.seed})")
    if not o.guidance >= 0:  # also NaN
        raise OptionError(f"--guidance: must be 0 or more (got {o.guidance})")
    if not o.autoguidance >= 0:
        raise OptionError(f"--autoguidance: must be 0 or more (got {o.autoguidance})")
    if o.sampler not in SAMPLERS:
        raise OptionError(f"--sampler: unknown {o.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if o.out.exists() and not o.out.is_dir():
        raise OptionError(f"--out: {o.out} exists and is not a folder")


def pick_device(spec: str) -> torch.device:
    from diffusion_core.distributed import default_device

    if spec == "auto":
        return default_device()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OptionError(f"--device: expected auto, cpu, cuda or cuda:N (got {spec!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device: CUDA is not available here (got {spec!r})")
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device: expected auto, cpu, cuda or cuda:N (got {spec!r})")
    return device


def run(o: GenerateOptions) -> dict[str, Any]:
    """Generate; returns the record written to ``generate.json`` (on every rank)."""
    from dataclasses import replace

    from diffusion_core.distributed import cleanup, setup_distributed
    from diffusion_core.sampler_registry import spec_of

    check_options(o)
    o = replace(o, spacing=o.spacing or spec_of(o.sampler).spacing)  # recorded as used
    settings = parse_settings(o.sampler, o.settings)
    device = pick_device(o.device)
    checkpoint = resolve_model(o.model)
    if not checkpoint.is_file():
        hint = "run the train stage first" if o.model == str(paths.MODEL) else "check --model"
        raise StageError(f"--model: {checkpoint} is missing: {hint}")
    try:
        dist = setup_distributed(device=device.type)
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"cannot start the process group: {exc}") from None
    try:
        return _generate(o, settings, checkpoint, dist if dist.world_size > 1 else None, device)
    finally:
        cleanup()


def _generate(o: GenerateOptions, settings: dict[str, Any], checkpoint: Path, dist: Any,
              device: torch.device) -> dict[str, Any]:
    from diffusion_core.distributed import barrier
    from diffusion_core.guidance import network_evaluations
    from diffusion_core.samplers import compatible, sampling_grid
    from pipeline.files import file_digest, write_bytes, write_json
    from pipeline.image_grid import array_png, grid_png
    from pipeline.sampling import Recipe, guided_denoiser, load_model
    from pipeline.shards import draw, gather, share

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if dist is not None:
        device = dist.device
    model = load_model(device, checkpoint)
    process = model.process
    labels = parse_classes(o.classes, model.num_classes, o.n)
    if o.guidance > 0 and labels is None:
        raise OptionError(
            f"--guidance: needs class labels from a class-conditional model (got {o.guidance})"
        )
    recipe = Recipe(o.sampler, steps=o.steps, spacing=o.spacing, guidance=o.guidance,
                    autoguidance=o.autoguidance, clip_x0=o.clip_x0, settings=settings)
    reason = compatible(recipe.sampler, process, recipe.steps)
    if reason is not None:
        raise OptionError(f"--steps: {reason}")
    try:
        sampling_grid(process, recipe.sampler, recipe.steps or 2, o.spacing)
    except ValueError as exc:
        raise OptionError(f"--spacing: {exc} (got {o.spacing!r})") from None
    try:
        guided = guided_denoiser(model, recipe, device, option="--autoguidance")
    except StageError as exc:  # a model without a guide snapshot: a bad option here
        raise OptionError(str(exc)) from None
    o.out.mkdir(parents=True, exist_ok=True)

    def write_pngs(indices: list[int], images: torch.Tensor) -> None:
        for i, image in zip(indices, images.permute(0, 2, 3, 1).numpy(), strict=True):
            label = None if labels is None else labels[i]
            write_bytes(o.out / image_name(i, label, o.seed + i), array_png(image))

    start = time.perf_counter()
    mine = draw(
        model, guided, recipe, indices=share(o.n, rank, world), first_seed=o.seed,
        labels=None if labels is None else torch.tensor(labels), batch_size=o.batch_size,
        device=device, desc="generate", on_batch=write_pngs if o.png else None,
    )
    wall_s = time.perf_counter() - start
    drawn = gather(mine, o.n)  # rank 0 writes the npz and the grid
    nfe = float(drawn.nfe.double().mean()) * network_evaluations(guided, labels is not None)
    record: dict[str, Any] = {}
    if rank == 0:
        everything = np.ascontiguousarray(drawn.images.permute(0, 2, 3, 1).numpy())  # N, H, W, C
        seeds = np.arange(o.seed, o.seed + o.n, dtype=np.int64)
        label_array = np.asarray(labels if labels is not None else [-1] * o.n, dtype=np.int64)
        if o.npz:
            buf = _npz_bytes(images=everything, labels=label_array, seeds=seeds)
            write_bytes(o.out / "images.npz", buf)
        write_bytes(o.out / "grid.png", grid_png(drawn.images))
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
        record = {
            "options": options,
            "settings": settings,
            "checkpoint": str(checkpoint),
            "model_sha256": file_digest(checkpoint),
            "process": process.describe(),
            "nfe_per_image": nfe,
            "world_size": world,
            "device": device.type,
            "wall_s": round(wall_s, 3),
        }
        write_json(o.out / "generate.json", record)
        print(f"generate: {o.n} images in {o.out} ({wall_s:.1f} s, {world} process(es), "
              f"{nfe:.0f} network evaluations per image)", flush=True)
    barrier()
    return record


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
