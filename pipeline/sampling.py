"""The one path from a trained model file to images.

:func:`load_model` puts a model file (``runs/train/model.pt``: the network's config and EMA
weights, the noise process, the prediction and, with ``train.guide_at``, the guide's weights) on
a chosen device; :func:`guided_denoiser` wraps it for a :class:`Recipe`: autoguidance
``D_w = D + w (D - D_guide)`` (Karras et al. 2024), then classifier-free guidance
``eps_w = (1 + w) eps(x, c) - w eps(x, null)`` (Ho & Salimans 2022); :func:`sample_images` draws
the images of given seeds and labels in batches through :func:`diffusion_core.samplers.generate`,
which clamps every ``x_0`` estimate to [-1, 1] when the recipe says ``clip_x0``.

The sample stage (:mod:`pipeline.sample`, which shares the seeds over torchrun ranks through
:mod:`pipeline.shards`), ``diffusion generate`` (:mod:`pipeline.generate`) and the MLflow model
(:mod:`pipeline.mlflow_model`) all sample through here, so one recipe and one seed give one image,
bit for bit, whichever of them asks::

    device = torch.device("cpu")
    model = load_model(device, Path("runs/train/model.pt"))
    recipe = Recipe("ddim", steps=20, guidance=2.0)
    guided = guided_denoiser(model, recipe, device)
    out = sample_images(model, guided, recipe, seeds=[0, 1], labels=torch.tensor([3, 3]),
                        device=device)  # out.images: uint8 (2, C, H, W)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from diffusion_core.cuda_graphs import CUDAGraphNet
from diffusion_core.data import to_uint8
from diffusion_core.denoiser import Denoiser
from diffusion_core.guidance import AutoGuidance, ClassifierFreeGuidance
from diffusion_core.processes import NoiseProcess, make_process
from diffusion_core.samplers import generate
from diffusion_core.unet import UNet
from pipeline import paths
from pipeline.errors import StageError
from pipeline.files import read_model_file
from pipeline.progress import Progress

if TYPE_CHECKING:
    from pipeline.config import Method

#: samplers with at least this many steps also show a bar per step within each batch
STEP_BAR_MIN = 100


@dataclass(frozen=True)
class Recipe:
    """How to sample: a sampler of :data:`diffusion_core.samplers.SAMPLERS`, its ``steps``
    (None for ``ode_rk45``, which adapts its own), the time-grid ``spacing`` (None: the
    sampler's own, from :mod:`diffusion_core.sampler_registry`), the guidance
    weights, ``x_0`` clipping and the sampler's own ``settings`` (``eta``, ``snr``, ...)."""

    sampler: str
    steps: int | None = 50
    spacing: str | None = None
    guidance: float = 0.0
    autoguidance: float = 0.0
    clip_x0: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler == "ode_rk45":
            object.__setattr__(self, "steps", None)

    @classmethod
    def of_method(cls, m: Method) -> Recipe:
        """The recipe of a ``methods:`` entry of ``params.yaml``."""
        return cls(sampler=m.sampler, steps=getattr(m, "steps", None),
                   spacing=getattr(m, "spacing", None), guidance=m.guidance,
                   autoguidance=m.autoguidance, clip_x0=m.clip_x0, settings=m.settings())

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`diffusion_core.samplers.generate` beyond the
        denoiser, process, sampler, shape, seeds, labels and device."""
        steps = {} if self.steps is None else {"steps": self.steps}
        return {**steps, "spacing": self.spacing, "clip_x0": self.clip_x0, **self.settings}


class Model(NamedTuple):
    """A model file on a device: its EMA network as a denoiser, its process and its contents."""

    denoiser: Denoiser
    process: NoiseProcess
    file: dict[str, Any]

    @property
    def num_classes(self) -> int:
        """Class labels the network takes (0: unconditional); label ``num_classes`` is null."""
        return int(getattr(self.denoiser.net, "num_classes", 0))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        net = self.denoiser.net
        return (net.in_channels, net.image_size, net.image_size)


def _network(config: dict[str, Any], state: dict[str, Tensor], device: torch.device) -> Any:
    net = UNet(**config)
    net.load_state_dict(state)
    net = net.to(device).eval()
    if device.type == "cuda":  # fixed-shape sampling replays one CUDA graph per batch shape
        net = CUDAGraphNet(net)
    return net


def load_model(device: torch.device, path: Path = paths.MODEL) -> Model:
    """The EMA network of ``path`` (``runs/train/model.pt``) on ``device`` as a denoiser, its
    process and the file's contents. On CUDA the network is replayed from CUDA graphs
    (:class:`CUDAGraphNet`: the same images, a little faster; it runs eagerly under autograd)."""
    m = read_model_file(path)
    process = make_process(**m["process"])
    net = _network(m["model_config"], m["ema"], device)
    return Model(Denoiser(net, process, m["prediction"]), process, m)


def guided_denoiser(model: Model, recipe: Recipe, device: torch.device,
                    option: str = "autoguidance") -> Any:
    """The model's denoiser with autoguidance against the file's guide snapshot (weight
    ``recipe.autoguidance``), then classifier-free guidance (``recipe.guidance``); a weight of 0
    leaves its wrapper out. A model file without a guide is a :class:`StageError` naming
    ``option``."""
    guided: Any = model.denoiser
    if recipe.autoguidance > 0:
        guide = model.file.get("guide")
        if guide is None:
            raise StageError(f"{option}: the model has no guide snapshot; train it with "
                             f"train.guide_at > 0 (e.g. 0.25) (got {option}={recipe.autoguidance})")
        weak = _network(model.file["model_config"], guide["ema"], device)
        guided = AutoGuidance(guided, Denoiser(weak, model.process, model.denoiser.prediction),
                              recipe.autoguidance)
    return ClassifierFreeGuidance(guided, recipe.guidance) if recipe.guidance > 0 else guided


def method_labels(method: Method, n: int, num_classes: int) -> Tensor | None:
    """Labels ``classes[i % len(classes)]`` of images ``0..n-1``; None (the null label) for an
    unconditional net or an ``unconditional`` method."""
    if num_classes == 0 or method.unconditional:
        return None
    classes = method.classes if method.classes is not None else list(range(num_classes))
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.int64)


class Sampled(NamedTuple):
    """uint8 images ``(k, C, H, W)`` and the sampler's denoiser calls ``(k,)`` of the batch each
    was drawn in (times :func:`~diffusion_core.guidance.network_evaluations`: the NFE)."""

    images: Tensor
    calls: Tensor


def step_progress(desc: str, steps: int | None) -> Progress:
    """A per-step bar for long samplers (``steps >= STEP_BAR_MIN``), else a silent one."""
    long = steps is not None and steps >= STEP_BAR_MIN
    return Progress(steps or 0, f"{desc} steps", unit="step", leave=False, enabled=long)


def sample_images(
    model: Model,
    guided: Any,
    recipe: Recipe,
    *,
    seeds: Sequence[int],
    labels: Tensor | None,
    device: torch.device,
    batch_size: int | None = None,
    desc: str | None = None,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
) -> Sampled:
    """Image ``k`` from seed ``seeds[k]`` (its prior draw and all its noise) and label
    ``labels[k]`` (None: the null label), drawn with ``guided`` (:func:`guided_denoiser`) in
    batches of ``batch_size`` (None: one batch); it depends on its seed and label only.
    ``desc`` names a progress bar counting images (None: none); ``on_batch(positions, images)``
    sees each batch's uint8 images as soon as they are drawn."""
    batch = batch_size or max(1, len(seeds))
    chunks = [torch.zeros((0, *model.shape), dtype=torch.uint8)]
    calls = [torch.zeros(0, dtype=torch.int64)]
    bar = Progress(len(seeds), desc or "", unit="img", every=batch, enabled=desc is not None)
    with torch.no_grad(), bar:
        for lo in range(0, len(seeds), batch):
            positions = list(range(lo, min(lo + batch, len(seeds))))
            with step_progress(desc or "", recipe.steps if desc else None) as step_bar:
                out = generate(
                    guided, model.process, recipe.sampler, shape=model.shape,
                    seeds=[seeds[k] for k in positions],
                    labels=None if labels is None else labels[positions], device=device,
                    callback=step_bar.callback() if step_bar.enabled else None,
                    **recipe.generate_kwargs(),
                )
            images = to_uint8(out.x.cpu())
            if on_batch is not None:
                on_batch(positions, images)
            chunks.append(images)
            calls.append(torch.full((len(positions),), out.nfe, dtype=torch.int64))
            bar.update(len(positions), nfe=out.nfe)
    return Sampled(torch.cat(chunks), torch.cat(calls))
