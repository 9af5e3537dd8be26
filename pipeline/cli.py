"""The ``diffusion`` command line: one command per DVC stage.

Every command reads ``--params`` (default ``params.yaml``), validates it (a bad file prints one
line ``params.yaml: key: problem (got value)`` and exits 2) and writes its outputs atomically.
Exit codes: 0 done, 1 failure, 2 bad parameters, 130/143 interrupted by SIGINT/SIGTERM. Every
failure is one line on stderr; ``DIFFUSION_DEBUG=1`` or ``diffusion --debug`` shows tracebacks.
Stage modules are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from pipeline import guard
from pipeline.config import Params, ParamsError, load_params
from pipeline.errors import StageError, StageInterruptedError

app = typer.Typer(
    name="diffusion",
    help="Diffusion-model pipeline: prepare, classifier, train, distill, sample, evaluate, report, "
         "track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

ParamsOption = Annotated[
    Path,
    typer.Option(
        "--params",
        "-p",
        dir_okay=False,
        help="The parameters file (validated; see pipeline/config.py).",
    ),
]
MethodOption = Annotated[
    str,
    typer.Option("--method", "-m", help="A sampling method: a key under `methods:` in params."),
]
MethodsOption = Annotated[
    list[str] | None,
    typer.Option("--method", "-m",
                 help="A method to score (repeatable); default: every method in params."),
]
DEFAULT_PARAMS = Path("params.yaml")


def _run(stage: Callable[..., Any], params_file: Path, **kwargs: Any) -> None:
    """Validate params, run ``stage(params, **kwargs)`` and turn every failure into one line on
    stderr and an exit code (2 bad parameters or usage, 1 failure, 130/143 interrupted).
    ``DIFFUSION_DEBUG=1`` (or ``diffusion --debug``) re-raises unexpected errors instead."""
    guard.die_with_parent()
    code, message = _outcome(stage, params_file, **kwargs)
    guard.record_exit(code)
    if message:
        typer.echo(message, err=True)
    if code:
        raise typer.Exit(code=code)


def _outcome(stage: Callable[..., Any], params_file: Path, **kwargs: Any) -> tuple[int, str]:
    """``(exit code, one-line message or "")`` of running the stage."""
    from diffusion_core.checkpoint import CheckpointError

    try:
        params: Params = load_params(params_file)
    except ParamsError as exc:
        return 2, str(exc)
    try:
        stage(params, **kwargs)
    except ParamsError as exc:
        return 2, f"{params_file}: {exc}"
    except (StageError, CheckpointError) as exc:
        return 1, f"error: {exc}"
    except StageInterruptedError as exc:
        return exc.code, f"stopped: {exc}; the last checkpoint is kept, re-run to resume"
    except KeyboardInterrupt:
        return 130, "stopped: interrupted"
    except (click.exceptions.Exit, click.exceptions.ClickException, SystemExit):
        raise
    except FileNotFoundError as exc:
        if guard.debug():
            raise
        return 1, f"error: {exc.filename or exc} is missing: run the stage that writes it first"
    except OSError as exc:
        if guard.debug():
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"error: {where}{exc.strerror or exc}"
    except Exception as exc:
        if guard.debug():
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        return 1, (
            f"error: unexpected {type(exc).__name__}: {first} "
            f"(run with {guard.DEBUG_ENV}=1 for the traceback)"
        )
    return 0, ""


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show tracebacks (same as {guard.DEBUG_ENV}=1).")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or lines (DIFFUSION_QUIET=1).")
    ] = False,
) -> None:
    if debug:
        os.environ[guard.DEBUG_ENV] = "1"
    if quiet:
        os.environ["DIFFUSION_QUIET"] = "1"


@app.command()
def prepare(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Load the dataset, split it (stratified, seeded) and write data/prepared/."""
    from pipeline.prepare import run

    _run(run, params)


@app.command()
def classifier(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Train the evaluation classifier (the FID feature extractor) and cache reference features."""
    from pipeline.classifier import run

    _run(run, params)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Train the U-Net (under torchrun for several processes); resumes from checkpoints.

    Writes runs/train/model.pt, runs/train/loss.csv and metrics/train.json; logs a training run
    to MLflow with the model as a registered MLflow Model. Launch several processes with
    `python -m torch.distributed.run --standalone --nproc-per-node=N -m pipeline train`.
    """
    from pipeline.train import run

    _run(run, params)


@app.command()
def distill(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Distil the trained model into 1-4 step students (progressive distillation, under torchrun
    for several processes); resumes from runs/distill/checkpoint.pt.

    Writes runs/distill/student_K.pt per round (sampled by `methods.M.student: K`) and
    metrics/distill.json (images seen, wall time, beside the teacher's); with
    `distill.enabled: false` a skipped record only.
    """
    from pipeline.distill import run

    _run(run, params)


@app.command()
def sample(params: ParamsOption = DEFAULT_PARAMS, method: MethodOption = ...) -> None:
    """Sample `sample.n_images` images with one method; writes runs/samples/METHOD and a grid.

    Image i uses seed `seed + i`, so it is the same for any batch size. A sampler that does not
    fit the trained process is recorded as skipped (exit 0) with its reason.
    """
    from pipeline.sample import run

    _run(run, params, method=method)


@app.command()
def evaluate(params: ParamsOption = DEFAULT_PARAMS, method: MethodsOption = None) -> None:
    """FID with intervals, its floor, KID, P/R, D/C and near copies of every method's samples
    (or of each --method), in one process."""
    from pipeline.evaluate import run

    _run(run, params, methods=method)


@app.command()
def report(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Summarise every method: metrics/summary.json, reports/summary.md, reports/fid_vs_nfe.csv."""
    from pipeline.report import run

    _run(run, params)


@app.command("readme-table")
def readme_table(
    params: ParamsOption = DEFAULT_PARAMS,
    readme: Annotated[Path, typer.Option("--readme", help="The file with the results block.")]
    = Path("README.md"),
) -> None:
    """Write the results table of metrics/summary.json into README.md (between its markers), so
    the README states what the pipeline measured, never a hand-copied number."""
    from pipeline.report import write_readme_table

    def run(_: Params) -> None:
        changed = write_readme_table(readme)
        print(f"{readme}: results table {'updated' if changed else 'already up to date'}")

    _run(run, params)


@app.command()
def pictures(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Pictures of the process in reports/process: the forward noising, each method's reverse
    chain (GIF and strip, x_t beside the predicted x_0), the guidance sweep, labelled grids."""
    from pipeline.pictures import run

    _run(run, params)


@app.command()
def track(
    params: ParamsOption = DEFAULT_PARAMS,
    sync: Annotated[
        bool,
        typer.Option("--sync", help="Only tag finished DVC experiments' runs with their commits."),
    ] = False,
) -> None:
    """Log this evaluated state to MLflow (the last DVC stage): a pipeline run with all params,
    grids, reports and a link to the model's training run, and one nested run per method with
    its settings and scores. A state the store already holds is not logged again."""
    from pipeline.track import run
    from pipeline.track import sync as sync_run

    _run(sync_run if sync else run, params)


@app.command()
def encode(
    params: ParamsOption = DEFAULT_PARAMS,
    method: MethodOption = ...,
    out: Annotated[Path, typer.Option(help="Where to write the latents.")] = Path(
        "runs/latents.pt"
    ),
    source: Annotated[
        Path | None,
        typer.Option(help="Images to encode: a samples.pt or split .pt (default: the test split)."),
    ] = None,
    count: Annotated[int, typer.Option(help="How many images (the first ones).")] = 16,
) -> None:
    """Encode images into latents x_T by DDIM inversion on a ddim method's time grid."""
    from pipeline.codec import encode as run

    _run(run, params, method=method, out=out, source=source, count=count)


@app.command()
def decode(
    params: ParamsOption = DEFAULT_PARAMS,
    latents: Annotated[Path, typer.Option(help="Latents written by `encode`.")] = Path(
        "runs/latents.pt"
    ),
    out: Annotated[Path, typer.Option(help="Where to write the images (and OUT.png).")] = Path(
        "runs/decoded.pt"
    ),
) -> None:
    """Decode latents back into images with DDIM (eta = 0); prints the round-trip error."""
    from pipeline.codec import decode as run

    _run(run, params, latents=latents, out=out)


@app.command()
def generate(
    model: Annotated[str, typer.Option(
        "--model", help="A checkpoint (.pt) or an MLflow model URI (models:/NAME/VERSION).")
    ] = "runs/train/model.pt",
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write.")] = Path(
        "runs/generated"
    ),
    sampler: Annotated[str, typer.Option(help="ddpm, ddim, sde, pc, ode_heun, ode_rk45, "
                                         "dpmpp_2m, ... (diffusion_core.samplers).")] = "ddim",
    steps: Annotated[int, typer.Option(help="Sampling steps (ode_rk45 adapts its own).")] = 50,
    spacing: Annotated[str | None, typer.Option(
        help="Time-grid spacing (linspace, quadratic, logsnr, karras, ...); default: the "
             "sampler's own (docs/samplers.md).")] = None,
    guidance: Annotated[float, typer.Option(
        "--guidance", "-w", help="Classifier-free guidance weight w (scale 1 + w); 0 = none.")
    ] = 0.0,
    autoguidance: Annotated[float, typer.Option(
        "--autoguidance", help="Autoguidance weight w against the model's train.guide_at "
        "snapshot (Karras et al. 2024); 0 = none.")
    ] = 0.0,
    clip_x0: Annotated[bool, typer.Option(
        "--clip-x0", help="Clamp every x_0 estimate to [-1, 1] (after guidance).")
    ] = False,
    classes: Annotated[str, typer.Option(
        help="all (cycled), one class (3), a list (1,3,5) or none (the null label).")
    ] = "all",
    num: Annotated[int, typer.Option("--num", "-n", help="How many images.")] = 64,
    seed: Annotated[int, typer.Option(help="Image i uses seed SEED + i.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch (any: same images).")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="A sampler setting KEY=VALUE (e.g. eta=0.5); repeat for more.")
    ] = None,
    png: Annotated[bool, typer.Option(help="One PNG per image.")] = True,
    npz: Annotated[bool, typer.Option(help="All images in one images.npz.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Generate images from a trained model: PNGs named INDEX_classC_seedS.png, images.npz,
    grid.png and generate.json in --out. Runs under torchrun too (each rank takes its share of
    the seeds): `python -m torch.distributed.run --nproc-per-node=N -m pipeline generate ...`.

    Example: `diffusion generate --classes 3 -n 64 --sampler ddim --steps 20 -w 2`
    """
    from diffusion_core.checkpoint import CheckpointError
    from pipeline.generate import GenerateOptions, OptionError, run

    if quiet:
        os.environ["DIFFUSION_QUIET"] = "1"
    options = GenerateOptions(
        model=model, out=out, sampler=sampler, steps=steps, spacing=spacing, guidance=guidance,
        autoguidance=autoguidance, clip_x0=clip_x0, classes=classes, n=num, seed=seed,
        batch_size=batch_size, device=device,
        settings=list(settings or []), png=png, npz=npz,
    )
    guard.die_with_parent()
    try:
        run(options)
    except OptionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (StageError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("stopped: interrupted", err=True)
        raise typer.Exit(130) from None


@app.command("check-params")
def check_params(
    params: ParamsOption = DEFAULT_PARAMS,
    out: Annotated[
        Path | None,
        typer.Option(help="Also write this file (the `check` DVC stage's output) when valid."),
    ] = None,
) -> None:
    """Validate the parameters file as every stage would and print its hash (exit 2 with the
    problem if invalid). The first DVC stage: a bad edit stops `dvc repro` before any stage
    deletes its outputs."""
    from pipeline.checks import check_buildable
    from pipeline.params_digest import params_hash

    def show(p: Params) -> None:
        check_buildable(p)
        if out is not None:
            from pipeline.files import write_text

            write_text(out, "ok\n")  # constant: a valid edit does not re-run later stages
        typer.echo(f"{params}: ok (hash {params_hash(p)}, methods: {', '.join(p.methods)})")

    _run(show, params)


profile_app = typer.Typer(
    help="Profiles: params.yaml values for a dataset and machine (docs/profiles/NAME.yaml).",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")
ProfileArgument = Annotated[
    str, typer.Argument(help="A profile name (`diffusion profile list`) or a .yaml file.")
]


def _profile(name: str, params: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base, merged)`` mappings; a bad base or profile prints one line and exits 2."""
    import yaml

    from pipeline.profiles import merged_params

    try:
        try:
            base = yaml.safe_load(params.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ParamsError(f"{params}: cannot read ({exc})") from None
        if not isinstance(base, dict):
            raise ParamsError(f"{params}: expected a mapping of sections")
        merged, _ = merged_params(base, name)
    except ParamsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    return base, merged


@profile_app.command("list")
def profile_list() -> None:
    """The shipped profiles, one per line with its first comment line."""
    from pipeline.profiles import profile_names, profile_path

    for name in profile_names():
        first = profile_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        typer.echo(f"{name}: {first}")


@profile_app.command("show")
def profile_show(name: ProfileArgument, params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Print the parameters the profile gives (params.yaml merged with it, validated)."""
    import yaml

    _, merged = _profile(name, params)
    typer.echo(yaml.safe_dump(merged, sort_keys=False), nl=False)


@profile_app.command("args")
def profile_args(name: ProfileArgument, params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Print `-S key=value ...` that turn params.yaml into the profile's parameters:
    `dvc exp run $(diffusion profile args NAME)`."""
    from pipeline.profiles import dvc_overrides

    base, merged = _profile(name, params)
    try:
        overrides = dvc_overrides(base, merged)
    except ParamsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(" ".join(f"-S {o}" for o in overrides))


def main() -> None:
    """Console-script entry point (``diffusion``)."""
    app(prog_name="diffusion")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
