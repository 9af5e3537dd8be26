"""The typed model of ``params.yaml``: the one place the pipeline's parameters are defined.

Every section is a pydantic v2 model with ``extra="forbid"`` (a typo is an error) in lax mode, so
values that ``dvc exp run -S`` writes as strings (``"1e-05"``) still validate as numbers.
Cross-field checks live in :class:`Params` and name the key they concern.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class DatasetInfo(NamedTuple):
    """Facts about a dataset that the checks need before it is loaded."""

    size: int  # number of images
    image_size: int
    channels: int
    num_classes: int
    pixel_levels: int  # distinct pixel values (bits/dim are reported on this scale)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(size=1797, image_size=8, channels=1, num_classes=10, pixel_levels=17),
    "mnist": DatasetInfo(size=70000, image_size=28, channels=1, num_classes=10, pixel_levels=256),
}

SAMPLERS = ("ddpm", "ddim", "sde", "pc", "ode_heun", "ode_rk45",
            "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "edm_heun")
METHOD_NAME = r"^[a-z][a-z0-9_-]*$"
# Train settings that do not change what is learned (the library makes the global batch
# independent of nproc): changing them keeps checkpoints resumable.
BOOKKEEPING_TRAIN_KEYS = ("nproc", "threads_per_proc", "checkpoint_every", "keep_last", "log_every")


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are refused here, not by a stage at run time.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(_Section):
    dataset: Literal["digits", "mnist"]
    root: str | None = None
    test_fraction: float = Field(gt=0.0, lt=1.0)


class ProcessParams(_Section):
    name: Literal["ddpm", "vp", "subvp", "ve"]
    num_steps: int = Field(ge=1, le=100_000)  # the schedule tables are allocated
    schedule: Literal["linear", "cosine"]
    beta_start: float = Field(gt=0.0, lt=1.0)
    beta_end: float = Field(gt=0.0, lt=1.0)
    beta_min: float = Field(gt=0.0)
    beta_max: float = Field(gt=0.0)
    sigma_min: float = Field(gt=0.0)
    sigma_max: float = Field(gt=0.0)
    t_min: float = Field(gt=0.0, lt=1.0)

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``diffusion_core.processes.make_process`` for ``name``."""
        keys = {
            "ddpm": ("num_steps", "schedule", "beta_start", "beta_end"),
            "vp": ("beta_min", "beta_max", "t_min"),
            "subvp": ("beta_min", "beta_max", "t_min"),
            "ve": ("sigma_min", "sigma_max", "t_min"),
        }[self.name]
        return {k: getattr(self, k) for k in keys}


class ModelParams(_Section):
    base_channels: int = Field(ge=1)
    channel_mults: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    num_res_blocks: int = Field(ge=1)
    attention_resolutions: list[Annotated[int, Field(ge=1)]]
    dropout: float = Field(ge=0.0, lt=1.0)
    prediction: Literal["eps", "x0", "v"]
    conditional: bool


class TrainParams(_Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch size, split over nproc")
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    warmup_steps: int = Field(ge=0)
    grad_clip: float = Field(ge=0.0, description="max gradient norm; 0 = off")
    ema_decay: float = Field(ge=0.0, lt=1.0)
    ema_warmup: bool
    ema_std: float | None = Field(
        None, gt=0.0, le=0.28,
        description="EDM2 power-function EMA of this relative std; null = ema_decay",
    )
    loss_weighting: Literal["none", "min_snr", "edm"] = Field(
        "none", description="weight of the squared error per noise level (diffusion_core.losses)"
    )
    min_snr_gamma: float = Field(5.0, gt=0.0, description="gamma of min_snr (Hang et al. 2023)")
    sigma_data: float = Field(0.5, gt=0.0, description="data std of the edm weighting")
    t_sampling: Literal["uniform", "log_normal"] = Field(
        "uniform", description="training distribution of t (diffusion_core.noise_levels)"
    )
    p_mean: float = Field(-1.2, description="log_normal: mean of ln(sigma/alpha)")
    p_std: float = Field(1.2, gt=0.0, description="log_normal: std of ln(sigma/alpha)")
    p_uncond: float = Field(ge=0.0, lt=1.0)
    nproc: int = Field(ge=1)
    threads_per_proc: int = Field(ge=1)
    mixed_precision: Literal["no", "bf16", "auto"]
    compile: bool
    checkpoint_every: int = Field(ge=1)
    keep_last: int = Field(ge=1)
    log_every: int = Field(ge=1)


class ClassifierParams(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    feature_dim: int = Field(ge=2)


class SampleParams(_Section):
    n_images: int = Field(ge=2)
    batch_size: int = Field(ge=1)


#: the time-grid spacings of ``NoiseProcess.time_grid`` (``diffusion_core.processes.SPACINGS``)
Spacing = Literal["linspace", "leading", "trailing", "quadratic", "logsnr", "karras"]


class _Method(_Section):
    """Settings every sampling method shares."""

    guidance: float = Field(0.0, ge=0.0, description="classifier-free guidance weight w")
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="labels to sample, cycled; null = every class equally"
    )
    unconditional: bool = Field(
        False, description="sample a conditional network with its null label (no class labels)"
    )
    clip_x0: bool = Field(
        False, description="clamp every x_0 estimate to [-1, 1] (after guidance), eps re-derived"
    )

    def settings(self) -> dict[str, Any]:
        """The sampler-specific keyword arguments of ``samplers.generate``."""
        common = {"sampler", "guidance", "classes", "unconditional", "steps", "spacing",
                  "clip_x0"}
        return {k: v for k, v in self.model_dump().items() if k not in common}


class DDPMMethod(_Method):
    sampler: Literal["ddpm"]
    steps: int = Field(ge=1)
    spacing: Spacing = "linspace"
    variance: Literal["posterior", "beta"] = "posterior"


class DDIMMethod(_Method):
    sampler: Literal["ddim"]
    steps: int = Field(ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    spacing: Spacing = "linspace"


class SDEMethod(_Method):
    sampler: Literal["sde"]
    steps: int = Field(ge=1)
    spacing: Spacing = "linspace"


class PCMethod(_Method):
    sampler: Literal["pc"]
    steps: int = Field(ge=1)
    spacing: Spacing = "linspace"
    snr: float = Field(0.16, gt=0.0)
    corrector_steps: int = Field(1, ge=0)


class HeunMethod(_Method):
    sampler: Literal["ode_heun"]
    steps: int = Field(ge=1)
    spacing: Spacing = "linspace"


class RK45Method(_Method):
    sampler: Literal["ode_rk45"]
    rtol: float = Field(1.0e-5, gt=0.0)
    atol: float = Field(1.0e-5, gt=0.0)


class DPMSolverMethod(_Method):
    """DPM-Solver++ 2M / 3M / 2M-SDE (Lu et al. 2022): one evaluation per step."""

    sampler: Literal["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"]
    steps: int = Field(ge=1)
    spacing: Spacing = "logsnr"
    lower_order_final: bool = True


class UniPCMethod(_Method):
    """UniPC bh2 (Zhao et al. 2023): one evaluation per step."""

    sampler: Literal["unipc"]
    steps: int = Field(ge=1)
    order: int = Field(2, ge=1, le=3)
    spacing: Spacing = "logsnr"
    lower_order_final: bool = True


class EDMHeunMethod(_Method):
    """EDM Heun with churn (Karras et al. 2022, Algorithm 2): 2 steps - 1 evaluations.
    ``s_tmin``/``s_tmax`` bound the churned noise levels sigma/alpha (1e3 = above any here)."""

    sampler: Literal["edm_heun"]
    steps: int = Field(ge=2)
    spacing: Spacing = "karras"
    s_churn: float = Field(0.0, ge=0.0)
    s_tmin: float = Field(0.0, ge=0.0)
    s_tmax: float = Field(1.0e3, ge=0.0)
    s_noise: float = Field(1.0, ge=0.0)


Method = Annotated[
    DDPMMethod | DDIMMethod | SDEMethod | PCMethod | HeunMethod | RK45Method
    | DPMSolverMethod | UniPCMethod | EDMHeunMethod,
    Field(discriminator="sampler"),
]
MethodName = Annotated[str, Field(pattern=METHOD_NAME)]


class EvaluateParams(_Section):
    extractor: Literal["classifier", "inception"]
    batch_size: int = Field(ge=1, description="images per feature-extractor batch")
    bpd_images: int = Field(ge=0)
    bootstrap: int = Field(200, ge=10, description="bootstrap draws per FID / floor interval")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="level of the intervals")
    kid_subsets: int = Field(100, ge=2, description="random subsets per KID estimate")
    near_copy_quantile: float = Field(0.05, gt=0.0, lt=1.0)


class TrackingParams(_Section):
    """MLflow: where runs go and the name the trained model is registered under."""

    experiment: str = Field(
        "diffusion", min_length=1, description="MLflow experiment ($MLFLOW_EXPERIMENT_NAME wins)"
    )
    model_name: str = Field(
        "diffusion-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Model Registry name of the trained model",
    )
    register_model: bool = Field(True, description="register each new model version")


class Params(_Section):
    """The whole of ``params.yaml``."""

    seed: int = Field(ge=0, lt=2**63)
    data: DataParams
    process: ProcessParams
    model: ModelParams
    train: TrainParams
    classifier: ClassifierParams
    sample: SampleParams
    methods: dict[MethodName, Method] = Field(min_length=1)
    evaluate: EvaluateParams
    tracking: TrackingParams = TrackingParams()

    @property
    def dataset(self) -> DatasetInfo:
        return DATASETS[self.data.dataset]

    @property
    def test_size(self) -> int:
        """A lower bound on the held-out split's size.

        ``train_test_split`` rounds each class's test share, losing at most half an image per
        class; the exact size is in ``data/prepared/info.json``.
        """
        info = self.dataset
        return int(info.size * self.data.test_fraction - info.num_classes / 2)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        for message in _cross_field_errors(self):
            raise ValueError(message)
        return self

    def method(self, name: str) -> Method:
        """The method called ``name``; a :class:`ParamsError` naming the choices if absent."""
        if name not in self.methods:
            have = ", ".join(sorted(self.methods))
            raise ParamsError(f"methods: no method named {name!r} (have: {have})")
        return self.methods[name]


def _cross_field_errors(p: Params) -> list[str]:
    """Messages ``key: problem (got value)`` for values that are wrong only together."""
    errors: list[str] = []
    pr, info = p.process, p.dataset
    if pr.beta_end <= pr.beta_start:
        errors.append(f"process.beta_end: must exceed process.beta_start (got {pr.beta_end})")
    if pr.beta_max <= pr.beta_min:
        errors.append(f"process.beta_max: must exceed process.beta_min (got {pr.beta_max})")
    if pr.sigma_max <= pr.sigma_min:
        errors.append(f"process.sigma_max: must exceed process.sigma_min (got {pr.sigma_max})")
    size = info.image_size
    resolutions = [size // 2**i for i in range(len(p.model.channel_mults))]
    if size % 2 ** (len(p.model.channel_mults) - 1):
        errors.append(
            f"model.channel_mults: {len(p.model.channel_mults)} levels do not divide the "
            f"{size}x{size} images (got {p.model.channel_mults})"
        )
    for r in p.model.attention_resolutions:
        if r not in resolutions:
            errors.append(
                f"model.attention_resolutions: {r} is not a U-Net resolution "
                f"{resolutions} (got {p.model.attention_resolutions})"
            )
    if p.train.batch_size % p.train.nproc:
        errors.append(
            f"train.batch_size: must be divisible by train.nproc={p.train.nproc} "
            f"(got {p.train.batch_size})"
        )
    train_size = info.size - int(info.size * p.data.test_fraction + info.num_classes / 2) - 1
    if p.train.batch_size > train_size:
        errors.append(
            f"train.batch_size: must not exceed the {train_size} training images "
            f"(got {p.train.batch_size})"
        )
    if p.evaluate.bpd_images > p.test_size:
        errors.append(
            f"evaluate.bpd_images: must not exceed the {p.test_size} test images "
            f"(got {p.evaluate.bpd_images})"
        )
    if p.evaluate.bpd_images > 0 and not any(m.sampler == "ode_rk45" for m in p.methods.values()):
        errors.append(
            "evaluate.bpd_images: bits/dim are computed for ode_rk45 methods (their rtol/atol "
            f"set the ODE solver) and there is none (got {p.evaluate.bpd_images})"
        )
    for name, m in p.methods.items():
        key = f"methods.{name}"
        steps = getattr(m, "steps", None)
        if pr.name == "ddpm" and steps is not None and steps > pr.num_steps:
            errors.append(
                f"{key}.steps: must not exceed process.num_steps={pr.num_steps} for the "
                f"discrete DDPM process (got {steps})"
            )
        if m.unconditional and m.guidance > 0:
            errors.append(
                f"{key}.unconditional: cannot be combined with classifier-free guidance, which "
                f"needs class labels; set guidance: 0 (got guidance={m.guidance})"
            )
        if m.unconditional and m.classes is not None:
            errors.append(
                f"{key}.unconditional: samples with the null label, so it takes no classes; "
                f"set classes: null (got classes={m.classes})"
            )
        if m.guidance > 0 and not p.model.conditional:
            errors.append(
                f"{key}.guidance: needs a class-conditional model (model.conditional: true) "
                f"(got {m.guidance})"
            )
        if m.classes is not None:
            if not p.model.conditional:
                errors.append(f"{key}.classes: needs a class-conditional model (got {m.classes})")
            bad = [c for c in m.classes if c >= info.num_classes]
            if bad:
                errors.append(
                    f"{key}.classes: labels must be below {info.num_classes} (got {m.classes})"
                )
    return errors


class ParamsError(ValueError):
    """A problem with ``params.yaml``; its message is one line ``key: problem (got value)``."""


def _format_error(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    if len(loc) >= 3 and loc[0] == "methods" and loc[2] in SAMPLERS:
        del loc[2]  # the discriminated-union tag pydantic inserts
    msg = err["msg"]
    if err["type"] == "value_error" and not loc:
        return msg.removeprefix("Value error, ")
    if loc and loc[-1] == "[key]":
        return (
            f"{'.'.join(loc[:-1])}: a method name must match {METHOD_NAME} (got {err['input']!r})"
        )
    if err["type"] == "union_tag_not_found":
        return f"{'.'.join(loc)}.sampler: Field required"
    if err["type"] == "union_tag_invalid":
        msg = f"sampler must be one of {', '.join(SAMPLERS)}"
        got = err.get("input", {}).get("sampler") if isinstance(err.get("input"), dict) else None
        return f"{'.'.join(loc)}.sampler: {msg} (got {got!r})"
    where = ".".join(loc) if loc else "(top level)"
    if err["type"] == "missing":
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {err.get('input')!r})"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed ``params.yaml`` mapping; raise :class:`ParamsError` (one line)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (got {type(raw).__name__})")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = _format_error(errors[0])
        more = f" [and {len(errors) - 1} more]" if len(errors) > 1 else ""
        raise ParamsError(f"{source}: {first}{more}") from None


def load_params(path: str | Path) -> Params:
    """Read and validate ``path``; raise :class:`ParamsError` with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: invalid YAML{where}: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML builds timestamps such as 2001-13-01 or 9999-99-99 and fails in datetime.
        first = (str(exc).splitlines() or [""])[0]
        raise ParamsError(f"{path}: invalid YAML value: {first}") from None
    return validate_params(raw, source=str(path))


def load_params_or_exit(path: str | Path) -> Params:
    """:func:`load_params`, but print the one-line message to stderr and exit 2 on error."""
    try:
        return load_params(path)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def params_hash(params: Params) -> str:
    """A short hash of all validated parameters (formatting and comments do not count)."""
    return _digest(params.model_dump(mode="json"))[:12]


def train_config_hash(params: Params, data_digest: str) -> str:
    """Hash of everything that decides the trained weights: a resume is allowed only on a match.

    Covers ``seed``, ``data``, ``process``, ``model``, ``train`` (less bookkeeping keys such as
    ``log_every``) and the digest of the prepared training data.
    """
    train = params.train.model_dump(mode="json")
    for key in BOOKKEEPING_TRAIN_KEYS:
        train.pop(key)
    return _digest(
        {
            "seed": params.seed,
            "data": params.data.model_dump(mode="json"),
            "process": params.process.model_dump(mode="json"),
            "model": params.model.model_dump(mode="json"),
            "train": train,
            "data_digest": data_digest,
        }
    )[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
