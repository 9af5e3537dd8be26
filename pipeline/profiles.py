"""Profiles: named sets of ``params.yaml`` values for a dataset and a machine (``docs/profiles``).

A profile is a partial ``params.yaml``: its sections merge key by key into the base parameters,
except ``methods``, which a profile replaces as a whole (it names exactly the sampling methods to
run). :func:`dvc_overrides` turns base and profile into the Hydra overrides that ``dvc exp run -S``
applies to ``params.yaml`` (``key=value`` for a changed key, ``+key=value`` for a new one,
``~key`` for a removed one), so that::

    dvc exp run $(diffusion profile args mnist-cpu)

runs the pipeline on the merged parameters, which :func:`merged_params` validates first.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, ParamsError, validate_params

#: the shipped profiles, one ``<name>.yaml`` each
PROFILES_DIR = Path(__file__).resolve().parents[1] / "docs" / "profiles"
#: sections a profile replaces instead of merging into
REPLACED = ("methods",)
_BARE = re.compile(r"^[A-Za-z_/.][A-Za-z0-9_/.\-]*$")  # a string Hydra reads back unchanged
_HYDRA_WORDS = {"null", "true", "false", "nan", "inf"}


def profile_names() -> list[str]:
    """The shipped profiles' names."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    """The file of profile ``name`` (a shipped name, or a path to a YAML file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = PROFILES_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise ParamsError(
            f"profile {name!r}: no such profile (shipped: {', '.join(profile_names())}; "
            "or give the path of a .yaml file)"
        )
    return shipped


def load_profile(name: str) -> dict[str, Any]:
    """The mapping profile ``name`` holds (a ParamsError if it is not one)."""
    path = profile_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ParamsError(f"{path}: a profile is a mapping of params.yaml sections")
    return raw


def merge(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``profile``'s values: mappings merge key by key; ``methods`` is replaced."""
    out = copy.deepcopy(base)

    def into(target: dict[str, Any], update: dict[str, Any], top: bool) -> None:
        for key, value in update.items():
            replace = top and key in REPLACED
            if isinstance(value, dict) and isinstance(target.get(key), dict) and not replace:
                into(target[key], value, top=False)
            else:
                target[key] = copy.deepcopy(value)

    into(out, profile, top=True)
    return out


def merged_params(base: dict[str, Any], name: str) -> tuple[dict[str, Any], Params]:
    """The merged mapping and its validation (a one-line ParamsError naming the profile)."""
    raw = merge(base, load_profile(name))
    return raw, validate_params(raw, source=f"profile {name}")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, without spaces (one shell word)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _BARE.match(value) and value.lower() not in _HYDRA_WORDS:
            return value
        if any(c.isspace() for c in value) or "'" in value:
            raise ParamsError(f"profile value {value!r}: pass it with -S by hand (space or quote)")
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"profile value {value!r}: unsupported type {type(value).__name__}")


def dvc_overrides(base: dict[str, Any], target: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra overrides that turn ``base`` into ``target``: removals first, then changes."""
    removed, changed = [], []
    for key in base:
        if key not in target:
            removed.append(f"~{prefix}{key}")
    for key, value in target.items():
        if key not in base:
            changed.append(f"+{prefix}{key}={hydra_value(value)}")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            sub = dvc_overrides(base[key], value, f"{prefix}{key}.")
            removed += [s for s in sub if s.startswith("~")]
            changed += [s for s in sub if not s.startswith("~")]
        elif value != base[key] or type(value) is not type(base[key]):
            changed.append(f"{prefix}{key}={hydra_value(value)}")
    return removed + changed
