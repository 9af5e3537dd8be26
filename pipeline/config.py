"""The typed model of ``params.yaml``: the one place the pipeline's parameters are defined.

Every section is a pydantic v2 model with ``extra="forbid"`` (a typo is an error) in lax mode, so
values that ``dvc exp run -S`` writes as strings (``"1e-05"``) still validate as numbers.
Cross-field checks live in :class:`Params` and name the key they concern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from diffusion_core.sampler_registry import SPECS, SamplerSpec, Setting
from pipeline.dataset_facts import DATASETS, data_errors, dataset_errors

METHOD_NAME = r"^[a-z][a-z0-9_-]*$"


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are refused here, not by a stage at run time.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(_Section):
    dataset: Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"]
    root: str | None = Field(None, description="folder of the dataset's files")
    download: bool = Field(
        False, description="fetch missing mnist / fashion_mnist / cifar10 files (needs a network)"
    )
    image_size: int | None = Field(
        None, ge=1, description="folder: the size images are resized to; others: null (auto)"
    )
    channels: int | None = Field(
        None, description="folder: 1 grey / 3 RGB (converted), null = as the files are"
    )
    test_fraction: float = Field(gt=0.0, lt=1.0)

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, value: int | None) -> int | None:
        if value not in (None, 1, 3):
            raise ValueError("must be 1 (grey), 3 (RGB) or null")
        return value


class ProcessParams(_Section):
    name: Literal["ddpm", "vp", "subvp", "ve", "rectified_flow"]
    num_steps: int = Field(ge=1, le=100_000)  # the schedule tables are allocated
    schedule: Literal["linear", "cosine"]
    beta_start: float = Field(gt=0.0, lt=1.0)
    beta_end: float = Field(gt=0.0, lt=1.0)
    logsnr_shift: float = Field(default=0.0, ge=-20.0, le=20.0)
    beta_min: float = Field(gt=0.0)
    beta_max: float = Field(gt=0.0)
    sigma_min: float = Field(gt=0.0)
    sigma_max: float = Field(gt=0.0)
    t_min: float = Field(gt=0.0, lt=1.0)
    shift: float = Field(
        default=1.0, gt=0.0, le=100.0,
        description="rectified_flow: SD3's timestep shift of the sampling grid (1 = none)",
    )

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``diffusion_core.processes.make_process`` for ``name``."""
        keys = {
            "ddpm": ("num_steps", "schedule", "beta_start", "beta_end", "logsnr_shift"),
            "vp": ("beta_min", "beta_max", "t_min"),
            "subvp": ("beta_min", "beta_max", "t_min"),
            "ve": ("sigma_min", "sigma_max", "t_min"),
            "rectified_flow": ("t_min", "shift"),
        }[self.name]
        return {k: getattr(self, k) for k in keys}


class ModelParams(_Section):
    base_channels: int = Field(ge=1)
    # upper bounds far above any real U-Net, so that check-params never spends minutes and
    # gigabytes building a network of a million blocks (on the meta device) before refusing it
    channel_mults: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=16)
    num_res_blocks: int = Field(ge=1, le=64)
    attention_resolutions: list[Annotated[int, Field(ge=1)]]
    dropout: float = Field(ge=0.0, lt=1.0)
    prediction: Literal["eps", "x0", "v", "flow"]
    conditional: bool
    patch_size: int = Field(
        1, ge=1, le=64,
        description="fold p x p pixel patches into channels before the U-Net (1: none)",
    )


class TrainParams(_Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch size, split over nproc")
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    warmup_steps: int = Field(ge=0)
    lr_decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="lr decay to 0 at the last step, after the warm-up"
    )
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
    t_sampling: Literal["uniform", "log_normal", "logit_normal"] = Field(
        "uniform", description="training distribution of t (diffusion_core.noise_levels)"
    )
    p_mean: float = Field(-1.2, description="log_normal: mean of ln(sigma/alpha)")
    p_std: float = Field(1.2, gt=0.0, description="log_normal: std of ln(sigma/alpha)")
    logit_mean: float = Field(0.0, description="logit_normal: mean of logit(t) (SD3)")
    logit_std: float = Field(1.0, gt=0.0, description="logit_normal: std of logit(t) (SD3)")
    p_uncond: float = Field(ge=0.0, lt=1.0)
    guide_at: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="keep the EMA weights at this share of the steps as the autoguidance guide; "
                    "0 = none",
    )
    nproc: int = Field(ge=1)
    threads_per_proc: int = Field(ge=1)
    mixed_precision: Literal["fp32", "bf16", "auto"]
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model; auto = on one CUDA device only")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "reduce-overhead"
    channels_last: bool = False
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
    batch_size: int = Field(ge=1, description="images per batch, per process")
    nproc: int = Field(
        1, ge=1, description="torchrun processes (one per GPU); the images do not depend on it"
    )


#: the time-grid spacings of ``NoiseProcess.time_grid`` (``diffusion_core.processes.SPACINGS``)
Spacing = Literal["linspace", "leading", "trailing", "quadratic", "logsnr", "karras"]


class _Method(_Section):
    """Settings every sampling method shares; each sampler's model (:data:`METHOD_MODELS`) adds
    ``sampler``, ``steps`` and ``spacing`` (where it takes steps) and its settings."""

    guidance: float = Field(0.0, ge=0.0, description="classifier-free guidance weight w")
    autoguidance: float = Field(
        0.0, ge=0.0, description="autoguidance weight w against the train.guide_at snapshot"
    )
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="labels to sample, cycled; null = every class equally"
    )
    unconditional: bool = Field(
        False, description="sample a conditional network with its null label (no class labels)"
    )
    clip_x0: bool = Field(
        False, description="clamp every x_0 estimate to [-1, 1] (after guidance), eps re-derived"
    )
    student: int | None = Field(
        None, ge=1, description="sample the distilled student of this many steps "
                                "(runs/distill/student_<k>.pt; ddim, eta 0, trailing); null = the "
                                "trained model",
    )

    def settings(self) -> dict[str, Any]:
        """The sampler-specific keyword arguments of ``samplers.generate``."""
        names = SPECS[self.sampler].setting_names()  # type: ignore[attr-defined]
        return {name: getattr(self, name) for name in names}


def _steps_rule(spec: SamplerSpec) -> AfterValidator:
    """``steps`` checked by the registry's rule (``SamplerSpec.steps_problem``, the one
    ``samplers.compatible`` applies), with its message."""

    def check(steps: int) -> int:
        problem = spec.steps_problem(steps)
        if problem is not None:
            raise PydanticCustomError("sampler_steps", problem)
        return steps

    return AfterValidator(check)


def _setting_field(setting: Setting) -> tuple[Any, Any]:
    """A registry setting as a pydantic field: its type (or choices), default, bounds."""
    kind: Any = Literal[setting.choices] if setting.choices else setting.type
    if setting.nullable:
        kind = kind | None
    return kind, Field(setting.default, description=setting.description, **setting.bounds())


def method_model(spec: SamplerSpec) -> type[_Method]:
    """The params model of a method using ``spec``'s sampler, derived from the registry: the
    shared settings of :class:`_Method`, ``sampler``, ``steps`` (at least ``spec.min_steps``)
    and ``spacing`` (default ``spec.spacing``) unless the sampler is adaptive, and every
    setting the sampler declares."""
    fields: dict[str, Any] = {"sampler": (Literal[spec.name], ...)}
    if spec.takes_steps:
        fields["steps"] = (Annotated[int, _steps_rule(spec)], Field(description="network steps"))
        fields["spacing"] = (Spacing, Field(spec.spacing, description="time-grid spacing"))
    fields.update({s.name: _setting_field(s) for s in spec.settings})
    title = "".join(part.title() for part in spec.name.split("_")) + "Method"
    return create_model(title, __base__=_Method, __doc__=spec.summary, **fields)


#: the params model of ``methods.<name>`` per sampler, all derived from the sampler registry
METHOD_MODELS: dict[str, type[_Method]] = {name: method_model(s) for name, s in SPECS.items()}
Method = Annotated[Union[tuple(METHOD_MODELS.values())],  # noqa: UP007
                   Field(discriminator="sampler")]
MethodName = Annotated[str, Field(pattern=METHOD_NAME)]


class DistillParams(_Section):
    """Progressive distillation (Salimans & Ho 2022) of the trained model's EMA weights: round
    ``r`` trains a student of ``teacher_steps / 2^r`` DDIM steps (``diffusion_core.distillation``).
    """

    enabled: bool = Field(False, description="run the distill stage (off: a skipped record)")
    teacher_steps: int = Field(
        64, ge=2, le=4096, description="N: the teacher's DDIM steps (trailing grid), a power of two"
    )
    rounds: int = Field(6, ge=1, le=12, description="halvings: students of N/2, ..., N/2^rounds")
    steps_per_round: int = Field(400, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch size, split over nproc")
    lr: float = Field(5.0e-4, gt=0.0)
    lr_decay: Literal["none", "linear", "cosine"] = Field(
        "linear", description="lr decay to 0 at each round's last step (the paper: linear)"
    )
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm; 0 = off")
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0, description="EMA of each round's student")
    prediction: Literal["v", "x0", "eps"] = Field(
        "v", description="the student's output; eps is ill-conditioned at 1-4 steps"
    )
    weighting: Literal["truncated_snr", "snr_plus_one"] = "truncated_snr"
    nproc: int = Field(1, ge=1)
    threads_per_proc: int = Field(1, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(50, ge=1)

    def student_steps(self) -> list[int]:
        """The step counts of the students the rounds write, in order: N/2, N/4, ..."""
        return [self.teacher_steps >> r for r in range(1, self.rounds + 1)]


class EvaluateParams(_Section):
    extractor: Literal["classifier", "inception"]
    batch_size: int = Field(ge=1, description="images per feature-extractor batch")
    bpd_images: int = Field(ge=0)
    bootstrap: int = Field(200, ge=10, description="bootstrap draws per FID / floor interval")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="level of the intervals")
    kid_subsets: int = Field(100, ge=2, description="random subsets per KID estimate")
    near_copy_quantile: float = Field(0.05, gt=0.0, lt=1.0)
    unclear_below: float = Field(
        0.9, gt=0.0, le=1.0,
        description="a sample is unclear when the evaluation classifier's top probability is "
                    "below this",
    )
    baseline: MethodName | None = Field(
        None, description="the method every other one is compared with (paired FID "
                          "difference); null = the first method",
    )

    def baseline_of(self, methods: dict[str, Any]) -> str:
        """The baseline method's name: ``baseline``, else the first of ``methods``."""
        return self.baseline if self.baseline is not None else next(iter(methods))


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
    distill: DistillParams = DistillParams()

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
    pr, info = p.process, DATASETS.get(p.data.dataset)
    errors += data_errors(p.data, info)
    if pr.beta_end <= pr.beta_start:
        errors.append(f"process.beta_end: must exceed process.beta_start (got {pr.beta_end})")
    if pr.beta_max <= pr.beta_min:
        errors.append(f"process.beta_max: must exceed process.beta_min (got {pr.beta_max})")
    if pr.sigma_max <= pr.sigma_min:
        errors.append(f"process.sigma_max: must exceed process.sigma_min (got {pr.sigma_max})")
    size = info.image_size if info is not None else p.data.image_size
    if size is not None:
        errors += _architecture_errors(p.model, size)
    if p.train.batch_size % p.train.nproc:
        errors.append(
            f"train.batch_size: must be divisible by train.nproc={p.train.nproc} "
            f"(got {p.train.batch_size})"
        )
    if p.sample.nproc > p.sample.n_images:
        errors.append(
            f"sample.nproc: more processes than the sample.n_images={p.sample.n_images} images "
            f"(got {p.sample.nproc})"
        )
    if p.evaluate.bpd_images > 0 and not any(m.sampler == "ode_rk45" for m in p.methods.values()):
        errors.append(
            "evaluate.bpd_images: bits/dim are computed for ode_rk45 methods (their rtol/atol "
            f"set the ODE solver) and there is none (got {p.evaluate.bpd_images})"
        )
    if p.evaluate.baseline is not None and p.evaluate.baseline not in p.methods:
        errors.append(
            f"evaluate.baseline: must name a method (have: {', '.join(p.methods)}) "
            f"(got {p.evaluate.baseline!r})"
        )
    errors += _method_errors(p)
    errors += _distill_errors(p)
    if info is not None:
        errors += dataset_errors(p, info)
    return errors


def _architecture_errors(m: ModelParams, size: int) -> list[str]:
    """The U-Net's own shape rule (``diffusion_core.unet.geometry_errors``) as params errors."""
    from diffusion_core.unet import geometry_errors

    return [f"model.{name}: {problem} (got {getattr(m, name)})"
            for name, problem in geometry_errors(size, m.channel_mults, m.attention_resolutions,
                                                 m.patch_size)]


def _method_errors(p: Params) -> list[str]:
    errors = []
    for name, m in p.methods.items():
        key = f"methods.{name}"
        steps = getattr(m, "steps", None)
        if p.process.name == "ddpm" and steps is not None and steps > p.process.num_steps:
            errors.append(
                f"{key}.steps: must not exceed process.num_steps={p.process.num_steps} for the "
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
        if m.classes is not None and not p.model.conditional:
            errors.append(f"{key}.classes: needs a class-conditional model (got {m.classes})")
        if m.autoguidance > 0 and p.train.guide_at == 0:
            errors.append(
                f"{key}.autoguidance: needs the guide snapshot of train.guide_at > 0 (e.g. 0.25) "
                f"(got autoguidance={m.autoguidance}, train.guide_at=0)"
            )
    return errors


def _distill_errors(p: Params) -> list[str]:
    """The distill section's own rules, and each ``student`` method's agreement with it: a
    student is sampled with ``ddim``, ``eta: 0``, ``spacing: trailing`` and its own steps."""
    d, errors = p.distill, []
    n = d.teacher_steps
    if n & (n - 1):
        errors.append(f"distill.teacher_steps: must be a power of two (got {n})")
    elif d.rounds > n.bit_length() - 1:
        errors.append(f"distill.rounds: at most log2(distill.teacher_steps={n}) = "
                      f"{n.bit_length() - 1} halvings (got {d.rounds})")
    if p.process.name == "ddpm" and n > p.process.num_steps:
        errors.append(f"distill.teacher_steps: must not exceed process.num_steps="
                      f"{p.process.num_steps} (got {n})")
    if d.enabled and d.batch_size % d.nproc:
        errors.append(f"distill.batch_size: must be divisible by distill.nproc={d.nproc} "
                      f"(got {d.batch_size})")
    for name, m in p.methods.items():
        errors += _student_errors(p, f"methods.{name}", m)
    return errors


def _student_errors(p: Params, key: str, m: Any) -> list[str]:
    """One line per way method ``key`` disagrees with the student it names."""
    k = m.student
    if k is None:
        return []
    if not p.distill.enabled:
        return [f"{key}.student: needs the distill stage (distill.enabled: true) (got {k})"]
    made = p.distill.student_steps()
    if k not in made:
        return [f"{key}.student: the distill rounds make students of {made} steps (got {k})"]
    errors = []
    if m.sampler != "ddim":
        errors.append(f"{key}.sampler: a student is sampled with ddim (got {m.sampler!r})")
    else:
        if m.steps != k:
            errors.append(f"{key}.steps: must equal student={k} (got {m.steps})")
        if m.spacing != "trailing":
            errors.append(f"{key}.spacing: a student's grid is trailing (got {m.spacing!r})")
        if m.eta != 0:
            errors.append(f"{key}.eta: a student takes deterministic steps, eta 0 (got {m.eta})")
    if m.autoguidance > 0:
        errors.append(f"{key}.autoguidance: a student has no guide snapshot "
                      f"(got {m.autoguidance})")
    return errors


class ParamsError(ValueError):
    """A problem with ``params.yaml``; its message is one line ``key: problem (got value)``."""


def _format_error(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    if len(loc) >= 3 and loc[0] == "methods" and loc[2] in SPECS:
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
        msg = f"sampler must be one of {', '.join(SPECS)}"
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
