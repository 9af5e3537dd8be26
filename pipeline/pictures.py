"""Stage ``pictures``: what the process does, in pictures (``reports/process/``).

* ``forward.png``: one training image noised at several ``t`` with the trained process,
  ``x_t = alpha(t) x_0 + sigma(t) eps`` (one ``eps``), with ``t`` and the SNR above each column.
* ``<method>_chain.gif`` and ``<method>_chain.png`` per configured method: the reverse chain of
  ``PICTURE_SEEDS`` seeds (``seed + i``, the method's labels), ``x_t`` beside the predicted
  ``x_0`` at ``FRAMES`` steps taken evenly from the sampler's callback ``{i, t, x, x0_pred}``.
  Kept cheap: a method of more than ``MAX_STEPS`` steps is drawn with the same sampler on a
  ``MAX_STEPS``-step grid, and the adaptive ``ode_rk45`` (one callback) with the same
  probability-flow ODE by Heun on ``ODE_STEPS`` steps; the title says so.
* ``guidance.png``: the guidance sweep, rows = classes, columns = w (0 and the w of every
  guided method, else ``DEFAULT_W``), one seed, the first guided method's sampler settings.
* ``<method>_labelled.png`` per conditional method that has samples: its samples, one row per
  class with the class printed at the row's start.

Each run clears the folder first, so methods removed from ``params.yaml`` leave no pictures.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data import to_uint8
from diffusion_core.distributed import default_device
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.processes import NoiseProcess
from diffusion_core.samplers import compatible, generate
from pipeline import paths
from pipeline.config import Method, Params
from pipeline.files import write_bytes, write_provenance
from pipeline.image_grid import png_bytes, tile
from pipeline.prepare import load_split
from pipeline.sampling import Recipe, guided_denoiser, load_model, method_labels

PROCESS_DIR = Path("reports/process")
PICTURE_SEEDS = 4
FRAMES = 16
MAX_STEPS = 100
ODE_STEPS = 50
FORWARD_TIMES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
DEFAULT_W = (0.0, 1.0, 2.0, 4.0)
FRAME_MS = 180


# ----------------------------------------------------------------------------- drawing helpers
def annotate(image: Any, *, top: Sequence[str] = (), left: Sequence[str] = (),
             title: str = "") -> Any:
    """``image`` with a title line, column headers ``top`` and row headers ``left`` (spread
    evenly over its width and height; a header may hold several lines) on a white margin."""
    from PIL import Image, ImageDraw

    line = 12
    top_lines = max((t.count("\n") + 1 for t in top), default=0)
    head = (line if title else 0) + line * top_lines
    margin = 6 * max((len(s) for s in left), default=0) + (6 if left else 0)
    width = max(image.width + margin, 6 * len(title) + 8)
    out = Image.new(image.mode, (width, image.height + head + 2),
                    color=255 if image.mode == "L" else (255, 255, 255))
    out.paste(image, (margin, head + 2))
    draw = ImageDraw.Draw(out)
    ink = 0 if image.mode == "L" else (0, 0, 0)
    if title:
        draw.text((2, 0), title, fill=ink)
    for k, text in enumerate(top):
        cell = image.width / len(top)
        draw.multiline_text((margin + k * cell + 2, head - line * top_lines + 1), text,
                            fill=ink, spacing=2)
    for k, text in enumerate(left):
        cell = image.height / len(left)
        draw.text((2, head + 2 + k * cell + cell / 2 - 5), text, fill=ink)
    return out


def gif_bytes(frames: Sequence[Any], ms: int = FRAME_MS) -> bytes:
    """An endlessly looping GIF of ``frames``; the last one is held three times as long."""
    buf = io.BytesIO()
    durations = [ms] * (len(frames) - 1) + [3 * ms]
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]),
                   duration=durations, loop=0, optimize=False, disposal=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- pictures
def forward_strip(process: NoiseProcess, x0: Tensor, seed: int,
                  times: Sequence[float] = FORWARD_TIMES) -> Any:
    """``x_t = alpha(t) x_0 + sigma(t) eps`` of one image (C, H, W in [-1, 1]) at ``times``,
    each at most the process's last time ``t_max`` (below 1 for rectified flow)."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cols, tops = [], []
    for t in (min(float(t), process.t_max) for t in times):
        tt = torch.tensor(float(t), dtype=torch.float64)
        xt = process.marginal(x0[None].double(), tt, eps[None].double()) if t > 0 else x0[None]
        cols.append(to_uint8(xt.float()))
        snr = float(process.alpha(tt) ** 2 / process.sigma(tt) ** 2) if t > 0 else math.inf
        tops.append(f"t={t:g}\nsnr={_snr(snr)}")
    image = tile(torch.cat(cols), 1, len(times), min_pixels=64)
    return annotate(image, top=tops, title="forward process: x_t = alpha(t) x_0 + sigma(t) eps"
                    " (t, SNR alpha^2/sigma^2)")


def _snr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def picture_plan(m: Method) -> tuple[str, int | None, str]:
    """``(sampler, steps, note)`` the chain of method ``m`` is drawn with (see module doc)."""
    steps = getattr(m, "steps", None)
    if m.sampler == "ode_rk45":
        return "ode_heun", ODE_STEPS, f" (drawn with ode_heun, {ODE_STEPS} steps)"
    if steps is not None and steps > MAX_STEPS:
        return m.sampler, MAX_STEPS, f" (drawn on {MAX_STEPS} of its {steps} steps)"
    return m.sampler, steps, ""


def reverse_chain(denoiser: Any, process: NoiseProcess, sampler: str, *, shape: Sequence[int],
                  seeds: Sequence[int], labels: Tensor | None, steps: int | None,
                  device: torch.device, frames: int = FRAMES,
                  **kwargs: Any) -> list[dict[str, Any]]:
    """``frames`` records ``{i, t, x, x0_pred}`` (uint8 on the CPU) taken evenly from the chain,
    the last step included."""
    seen: list[dict[str, Any]] = []

    def keep(info: dict[str, Any]) -> None:
        seen.append({"i": info["i"], "t": info["t"], "x": to_uint8(info["x"].cpu()),
                     "x0_pred": to_uint8(info["x0_pred"].cpu())})

    with torch.no_grad():
        generate(denoiser, process, sampler, shape=shape, seeds=seeds, labels=labels,
                 device=device, callback=keep, **({"steps": steps} if steps else {}), **kwargs)
    if len(seen) <= frames:
        return seen
    picks = sorted({round(k * (len(seen) - 1) / (frames - 1)) for k in range(frames)})
    return [seen[k] for k in picks]


def chain_frame(record: dict[str, Any], total: int, name: str) -> Any:
    """One GIF frame: row x_t over row predicted x_0, one column per seed."""
    x, x0 = record["x"], record["x0_pred"]
    image = tile(torch.cat([x, x0]), 2, x.shape[0])
    title = f"{name} step {record['i'] + 1}/{total} t={record['t']:.3f}"
    return annotate(image, left=["x_t", "x0"], title=title)


def chain_strip(chain: list[dict[str, Any]], name: str) -> Any:
    """Static strip: columns = the frames in time; per seed a row x_t and a row predicted x_0."""
    n = chain[0]["x"].shape[0]
    cells = [rec[key][k] for k in range(n) for key in ("x", "x0_pred") for rec in chain]
    image = tile(torch.stack(cells), 2 * n, len(chain))
    return annotate(image, top=[f"{rec['t']:.2f}" for rec in chain],
                    left=[lab for _ in range(n) for lab in ("x_t", "x0")],
                    title=f"{name}: reverse chain, x_t and predicted x_0 (columns: t)")


def guidance_sweep(denoiser: Any, process: NoiseProcess, ws: Sequence[float], *,
                   num_classes: int, seed: int, sampler: str, steps: int | None,
                   device: torch.device, shape: Sequence[int], **kwargs: Any) -> Any:
    """Rows = classes, columns = guidance weights w; every cell starts from the same seed."""
    labels = torch.arange(num_classes)
    columns = []
    with torch.no_grad():
        for w in ws:
            guided = ClassifierFreeGuidance(denoiser, w) if w > 0 else denoiser
            out = generate(guided, process, sampler, shape=shape, seeds=[seed] * num_classes,
                           labels=labels, device=device, **({"steps": steps} if steps else {}),
                           **kwargs)
            columns.append(to_uint8(out.x.cpu()))
    cells = torch.stack(columns, 1).flatten(0, 1)  # row-major: class, then w
    image = tile(cells, num_classes, len(ws))
    return annotate(image, top=[f"w={w:g}" for w in ws],
                    left=[str(c) for c in range(num_classes)],
                    title=f"classifier-free guidance ({sampler}, seed {seed}): rows class")


def labelled_grid(images: Tensor, labels: Tensor, name: str, per_class: int = 10) -> Any:
    """Samples (uint8) one row per class, at most ``per_class`` each, the class at the left."""
    classes = sorted({int(c) for c in labels.tolist()})
    rows = []
    for c in classes:
        mine = images[labels == c][:per_class]
        pad = torch.full((per_class - mine.shape[0], *images.shape[1:]), 255, dtype=torch.uint8)
        rows.append(torch.cat([mine, pad]))
    image = tile(torch.cat(rows), len(classes), per_class)
    return annotate(image, left=[str(c) for c in classes], title=f"{name}: samples by class")


def _message(text: str) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("L", (6 * len(text) + 16, 24), color=255)
    ImageDraw.Draw(img).text((8, 6), text, fill=0)
    return img


# ------------------------------------------------------------------------------------ stage
def run(params: Params) -> list[Path]:
    """Write every picture into ``reports/process``; returns the files written. On the CPU in
    one thread: every chain is a few images, for which more threads only wait on each other."""
    device = default_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    model = load_model(device)
    denoiser, process = model.denoiser, model.process
    num_classes, shape = model.num_classes, model.shape
    PROCESS_DIR.mkdir(parents=True, exist_ok=True)
    for old in [*PROCESS_DIR.glob("*.png"), *PROCESS_DIR.glob("*.gif")]:
        old.unlink()
    written: list[Path] = []

    def save(name: str, data: bytes) -> None:
        write_bytes(PROCESS_DIR / name, data)
        written.append(PROCESS_DIR / name)

    images, _ = load_split(paths.TRAIN_DATA)
    save("forward.png", png_bytes(forward_strip(process, images[0], params.seed)))

    seeds = [params.seed + i for i in range(PICTURE_SEEDS)]
    for name, m in params.methods.items():
        sampler, steps, note = picture_plan(m)
        reason = compatible(sampler, process, steps)
        if reason is not None:
            print(f"pictures: {name}: skipped ({reason})")
            continue
        labels = method_labels(m, PICTURE_SEEDS, num_classes)
        sampled = model if m.student is None else load_model(device, paths.student_path(m.student))
        guided = guided_denoiser(sampled, Recipe.of_method(m), device,
                                 option=f"methods.{name}.autoguidance")
        chain = reverse_chain(guided, process, sampler, shape=shape, seeds=seeds, labels=labels,
                              steps=steps, device=device, spacing=getattr(m, "spacing", None),
                              **(m.settings() if sampler == m.sampler else {}))
        total = steps or len(chain)
        frames = [chain_frame(rec, total, name + note) for rec in chain]
        save(f"{name}_chain.gif", gif_bytes(frames))
        save(f"{name}_chain.png", png_bytes(chain_strip(chain, name + note)))
        samples = paths.samples_dir(name) / "samples.pt"
        if samples.is_file():
            s = load_checkpoint(samples, map_location="cpu")
            if s.get("labels") is not None:
                grid = labelled_grid(s["images"], s["labels"], name)
                save(f"{name}_labelled.png", png_bytes(grid))

    save("guidance.png", png_bytes(_sweep(params, denoiser, process, num_classes, shape, device)))
    write_provenance("pictures", params, files=[p.name for p in written])
    print(f"pictures: {len(written)} files in {PROCESS_DIR}")
    return written


def _sweep(params: Params, denoiser: Any, process: NoiseProcess, num_classes: int,
           shape: Sequence[int], device: torch.device) -> Any:
    """The guidance sweep with the first guided method's sampler (else DDIM, 20 steps)."""
    if num_classes == 0:
        return _message("guidance sweep: the model is unconditional")
    guided = [m for m in params.methods.values() if m.guidance > 0]
    if guided:
        ws = sorted({0.0, *(m.guidance for m in guided)})
        sampler, steps, _ = picture_plan(guided[0])
        kwargs = {"spacing": getattr(guided[0], "spacing", None),
                  **(guided[0].settings() if sampler == guided[0].sampler else {})}
    else:
        ws, sampler, steps, kwargs = list(DEFAULT_W), "ddim", 20, {}
    if process.discrete and steps is not None:  # type: ignore[attr-defined]
        steps = min(steps, process.num_steps)  # type: ignore[attr-defined]
    return guidance_sweep(denoiser, process, ws, num_classes=num_classes, seed=params.seed,
                          sampler=sampler, steps=steps, device=device, shape=shape, **kwargs)
