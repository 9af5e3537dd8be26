"""Fast samplers: quality per compute on the trained model, and speed against diffusers.

    PYTHONPATH=. .venv/bin/python benchmarks/fast_samplers.py \
        --model runs/train/model.pt --classifier models/classifier.pt \
        --reference models/reference_features.pt [--n 400] [--nfe 5,8,10,15,20,50]

Part 1 (quality, needs the pipeline's trained model and classifier): FID with the classifier
features (the pipeline's ``fid_classifier``) against NFE for DDIM, DPM-Solver++ 2M/3M, UniPC-2/3
and EDM Heun (Karras sigmas, rho = 7; ``steps = (NFE + 1) / 2``), DDPM-1000 as reference, and the
real-data floor (``floor_fid``: m images of the held-out floor half F against R). Same seeds
and labels (class ``i % 10``) for every row. The interval is the pipeline's bootstrap interval
over the generated images (:func:`diffusion_core.evaluation.fid_interval`, ``--bootstrap``
resamples).
Part 2 (speed, random weights suffice): the default U-Net driven by our sampler and by diffusers'
scheduler loop at equal NFE on the same noise; overhead = sampler wall time / (NFE x one batched
network forward). Skip a part with ``--skip-quality`` / ``--skip-speed``.
Results: ``benchmarks/results/fast_samplers.md``, one section per machine and command line (a
rerun replaces its own section); the rows of the latest run of each part in
``fast_samplers_quality.csv`` and ``fast_samplers_speed.csv``, and the latest quality run's plot,
``fast_samplers_fid_nfe.png``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import RESULTS, command, machine, table, write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS
TITLE = "Fast samplers: quality per compute, and speed against diffusers"
INTRO = """Written by `python benchmarks/fast_samplers.py` (its docstring explains the options), one
section per machine and command line; a rerun replaces its own section. Quality: FID of `n`
samples of the trained default model with the pipeline's classifier features against the
held-out reference half R, a bootstrap interval (`fid_lo`, `fid_hi`), and the real-data floor
at m images of the floor half F. Speed: our sampler and diffusers' scheduler loop at equal NFE
on the same network (random weights), noise and time grid; `overhead` = wall time / (NFE x one
batched forward). Plot of the latest quality run: `fast_samplers_fid_nfe.png`."""

QUALITY_METHODS = {  # name: (sampler, settings, spacing)
    "ddim": ("ddim", {}, "linspace"),
    "dpmpp_2m": ("dpmpp_2m", {}, "logsnr"),
    "dpmpp_2m_clip": ("dpmpp_2m", {"clip_x0": True}, "logsnr"),  # params.yaml's dpmpp5
    "dpmpp_3m": ("dpmpp_3m", {}, "logsnr"),
    "unipc2": ("unipc", {"order": 2}, "logsnr"),
    "unipc3": ("unipc", {"order": 3}, "logsnr"),
    "edm_heun": ("edm_heun", {}, "karras"),
}


def environment() -> dict[str, str]:
    return {"machine": machine(), "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "command": command()}


def reference_sets(path: str):
    """The pipeline's evaluation protocol (``diffusion_core.evaluation``): reference statistics of
    the held-out half R and the floor half F, from the classifier stage's cached features."""
    from diffusion_core.checkpoint import load_checkpoint
    from diffusion_core.evaluation import ReferenceStatistics

    ref = load_checkpoint(path, map_location="cpu")
    test = ref["test"].numpy()
    return (ReferenceStatistics(test[ref["reference_index"].numpy()]),
            test[ref["floor_index"].numpy()])


def quality(args) -> list[dict]:
    from diffusion_core.checkpoint import load_checkpoint
    from diffusion_core.data import from_levels, from_uint8, to_levels, to_uint8
    from diffusion_core.denoiser import Denoiser
    from diffusion_core.processes import make_process
    from diffusion_core.rng import StackedRNG
    from diffusion_core.samplers import SAMPLERS
    from diffusion_core.unet import UNet
    from pipeline.classifier import FeatureClassifier, features

    m = load_checkpoint(args.model, map_location="cpu")
    net = UNet(**m["model_config"])
    net.load_state_dict(m["ema"])
    process = make_process(**m["process"])
    den = Denoiser(net.eval(), process, m["prediction"])
    from diffusion_core.denoiser import ClipX0

    c = load_checkpoint(args.classifier, map_location="cpu")
    clf = FeatureClassifier(**c["config"])
    clf.load_state_dict(c["state_dict"])
    clf.eval()
    from diffusion_core.evaluation import fid_interval, floor_fid

    reference, floor_f = reference_sets(args.reference)
    n = args.n
    labels = torch.arange(n) % max(net.num_classes, 1) if net.num_classes else None
    seeds = list(range(n))
    shape = (n, net.in_channels, net.image_size, net.image_size)
    env = environment()
    rows: list[dict] = []

    def score(name, sampler, steps, grid, settings, spacing):
        rng = StackedRNG(seeds)
        x_T = process.prior_sample(shape, rng)
        settings = dict(settings)
        d = ClipX0(den) if settings.pop("clip_x0", False) else den
        start = time.perf_counter()
        out = SAMPLERS[sampler](d, process, x_T, grid, labels=labels, rng=rng, **settings)
        wall = time.perf_counter() - start
        # as the pipeline stores (uint8) and scores them (snapped to the data's grey levels)
        images = from_levels(to_levels(from_uint8(to_uint8(out.x)), args.levels), args.levels)
        f = features(clf, images, 500, torch.device("cpu")).numpy()
        fid, lo, hi = fid_interval(f, reference, draws=args.bootstrap)
        row = {"method": name, "steps": steps, "nfe": out.nfe, "spacing": spacing,
               "fid": round(fid, 3), "fid_lo": round(lo, 3), "fid_hi": round(hi, 3),
               "wall_s": round(wall, 2), "n_images": n, **env}
        print(f"{name:9s} steps {steps:4d} NFE {out.nfe:4d}  FID {fid:7.3f} "
              f"[{lo:.3f}, {hi:.3f}]  {wall:.1f} s", flush=True)
        rows.append(row)

    m = min(n, floor_f.shape[0])
    fid, lo, hi, _ = floor_fid(floor_f, reference, m, draws=args.bootstrap)
    rows.append({"method": f"real data (floor, m = {m})", "steps": 0, "nfe": 0, "spacing": "",
                 "fid": round(fid, 3), "fid_lo": round(lo, 3), "fid_hi": round(hi, 3),
                 "wall_s": 0.0, "n_images": n, **env})
    print(f"floor FID {fid:.3f} [{lo:.3f}, {hi:.3f}]")
    if not args.no_ddpm:
        score("ddpm1000", "ddpm", 1000, process.time_grid(1000), {}, "linspace")
    for name in args.methods.split(","):
        sampler, settings, spacing = QUALITY_METHODS[name]
        for nfe in args.nfe:
            steps = (nfe + 1) // 2 if sampler == "edm_heun" else nfe
            if sampler == "edm_heun" and steps < 2:
                continue
            grid = process.time_grid(steps, spacing)
            score(name, sampler, steps, grid, settings, spacing)
    return rows


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_with_diffusers(net, x_T, labels, nfes: list[int], repeats: int,
                           sync=lambda: None) -> list[dict]:
    """Our DPM-Solver++ 2M and UniPC-2 against diffusers' scheduler loop driving the same
    ``net`` (eps prediction, linear DDPM betas, T = 1000) from the same ``x_T``, on diffusers'
    own time grid; per row the wall times (median of ``repeats``), each one's overhead =
    wall / (NFE x one bare batched forward, re-measured beside the row) and the largest
    difference between the two results."""
    import diffusers

    from diffusion_core.denoiser import Denoiser
    from diffusion_core.processes import DiscreteDDPM
    from diffusion_core.samplers import SAMPLERS

    process = DiscreteDDPM(1000)
    den = Denoiser(net, process, "eps")
    b, dev = x_T.shape[0], x_T.device
    t_one = torch.full((b,), 0.5, device=dev)
    schedulers = {
        "dpmpp_2m": (lambda: diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"), {}),
        "unipc": (lambda: diffusers.UniPCMultistepScheduler(solver_order=2), {"order": 2}),
    }
    rows = []
    for nfe in nfes:
        for sampler, (make, settings) in schedulers.items():
            sched = make()
            sched.set_timesteps(nfe)
            ks = [int(k) for k in sched.timesteps]
            grid = torch.tensor([(k + 1) / 1000 for k in ks] + [0.0], dtype=torch.float64)
            tk = [torch.full((b,), (k + 1) / 1000, device=dev) for k in ks]

            def ref_loop(sched=sched, tk=tk, nfe=nfe):
                sched.set_timesteps(nfe, device=dev)
                x = x_T
                with torch.no_grad():
                    for k, t in zip(sched.timesteps, tk, strict=True):
                        x = sched.step(net(x, t, labels), k, x).prev_sample
                return x

            def our_loop(sampler=sampler, grid=grid, settings=settings):
                return SAMPLERS[sampler](den, process, x_T, grid, labels=labels, **settings).x

            with torch.no_grad():  # re-measured beside each row: a busy machine drifts
                forward = _median_time(lambda: net(x_T, t_one, labels), repeats * nfe, sync)
            ours_s = _median_time(our_loop, repeats, sync)
            theirs_s = _median_time(ref_loop, repeats, sync)
            diff = (our_loop() - ref_loop()).abs().max().item()
            row = {"sampler": sampler, "nfe": nfe, "batch": b,
                   "forward_ms": round(1e3 * forward, 2),
                   "ours_s": round(ours_s, 4), "diffusers_s": round(theirs_s, 4),
                   "ours_overhead": round(ours_s / (nfe * forward), 3),
                   "diffusers_overhead": round(theirs_s / (nfe * forward), 3),
                   "ours_vs_diffusers": round(ours_s / theirs_s, 3),
                   "max_abs_diff": f"{diff:.1e}"}
            print(f"{sampler:9s} NFE {nfe:3d}  ours {ours_s:.3f} s (x{row['ours_overhead']}) "
                  f"diffusers {theirs_s:.3f} s (x{row['diffusers_overhead']})  "
                  f"max|diff| {diff:.1e}", flush=True)
            rows.append(row)
    return rows


def speed(args) -> list[dict]:
    from pipeline.config import load_params
    from pipeline.dataset import dataset_info
    from pipeline.train import build_unet

    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    net = build_unet(params).eval()
    info = dataset_info(params)
    b = args.speed_batch
    x_T = torch.randn(b, info.channels, info.image_size, info.image_size,
                      generator=torch.Generator().manual_seed(0))
    labels = torch.arange(b) % info.num_classes
    env = environment()
    return [{**row, **env}
            for row in compare_with_diffusers(net, x_T, labels, args.speed_nfe, args.repeats)]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["method"] for r in rows if r["nfe"] and r["steps"] < 1000):
        rs = [r for r in rows if r["method"] == name]
        ax.errorbar([r["nfe"] for r in rs], [r["fid"] for r in rs], marker="o", label=name,
                    yerr=[[r["fid"] - r["fid_lo"] for r in rs], [r["fid_hi"] - r["fid"] for r in rs]],
                    capsize=2)
    for r in rows:
        if r["steps"] == 1000 or r["nfe"] == 0:
            ax.axhline(r["fid"], ls="--" if r["nfe"] else ":", color="gray")
            ax.text(5, r["fid"], r["method"], fontsize=7, va="bottom")
    ax.set(xscale="log", xlabel="NFE", ylabel="FID (classifier features)",
           title="Quality per compute (dashed: DDPM-1000, dotted: real data)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(quality_rows: list[dict], speed_rows: list[dict]) -> str:
    lines = []
    for title, rows, keys in [
        ("Quality per compute", quality_rows,
         ["method", "steps", "nfe", "spacing", "fid", "fid_lo", "fid_hi", "wall_s"]),
        ("Speed at equal NFE", speed_rows,
         ["sampler", "nfe", "batch", "forward_ms", "ours_s", "diffusers_s", "ours_overhead",
          "diffusers_overhead", "ours_vs_diffusers", "max_abs_diff"]),
    ]:
        if not rows:
            continue
        env = rows[0]
        lines += [f"### {title}", "", f"torch {env['torch']}, {env['threads']} threads", ""]
        lines += table(keys, rows)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/train/model.pt")
    ap.add_argument("--classifier", default="models/classifier.pt")
    ap.add_argument("--reference", default="models/reference_features.pt")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")],
                    default=[5, 8, 10, 15, 20, 50])
    ap.add_argument("--methods", default=",".join(QUALITY_METHODS))
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--levels", type=int, default=17, help="the data's grey levels (digits: 17)")
    ap.add_argument("--no-ddpm", action="store_true", help="skip the DDPM-1000 reference row")
    ap.add_argument("--speed-nfe", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20])
    ap.add_argument("--speed-batch", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of the results page and files")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    q = [] if args.skip_quality else quality(args)
    s = [] if args.skip_speed else speed(args)
    if q:
        write_csv(q, args.out / "fast_samplers_quality.csv")
        plot(q, args.out / "fast_samplers_fid_nfe.png")
    if s:
        write_csv(s, args.out / "fast_samplers_speed.csv")
    text = markdown(q, s)
    write_section(args.out / "fast_samplers.md", TITLE, INTRO, f"{machine()}: `{command()}`", text)
    print(text)


if __name__ == "__main__":
    main()
    sys.exit(0)
