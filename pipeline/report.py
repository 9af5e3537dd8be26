"""Stage ``report``: one table across the sampling methods in ``params.yaml``.

Writes ``metrics/summary.json``, the markdown table ``reports/summary.md`` and
``reports/fid_vs_nfe.csv`` (``method,sampler,nfe,fid,fid_floor,extractor`` for ``dvc plots``),
and attaches the table to the MLflow run.
"""

from __future__ import annotations

from typing import Any

from pipeline import paths
from pipeline.config import Params
from pipeline.errors import StageError
from pipeline.files import provenance, read_json, write_json, write_text
from pipeline.tracking import Tracker

COLUMNS = (
    ("method", "method"),
    ("sampler", "sampler"),
    ("steps", "steps"),
    ("guidance", "guidance"),
    ("nfe", "NFE"),
    ("fid", "FID"),
    ("fid_floor", "FID floor"),
    ("kid", "KID"),
    ("class_accuracy", "class acc."),
    ("images_per_s", "images/s"),
    ("status", "status"),
)


def _read(path: Any, what: str) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise StageError(f"{path} is missing: run the {what} stage first") from None


def method_row(params: Params, name: str) -> dict[str, Any]:
    """The summary of one method from its sample and evaluate records."""
    method = params.methods[name]
    sampled = _read(paths.sample_metrics(name), f"sample@{name}")
    scored = _read(paths.eval_metrics(name), f"evaluate@{name}")
    ext = scored.get("extractor", params.evaluate.extractor)
    status = "ok" if sampled.get("status") == scored.get("status") == "ok" else "skipped"
    return {
        "method": name,
        "sampler": method.sampler,
        "steps": getattr(method, "steps", None),
        "guidance": method.guidance,
        "status": status,
        "reason": scored.get("reason") or sampled.get("reason"),
        "extractor": ext,
        "nfe": sampled.get("nfe"),
        "fid": scored.get(f"fid_{ext}"),
        "fid_floor": scored.get(f"fid_floor_{ext}"),
        "kid": scored.get(f"kid_{ext}"),
        "class_accuracy": scored.get("class_accuracy"),
        "images_per_s": sampled.get("images_per_s"),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]], extractor: str) -> str:
    """A markdown table of ``rows`` with a note on the metric definitions."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    notes = [
        "",
        f"FID and KID use the `{extractor}` feature extractor against the training split; the",
        "floor is the FID of as many held-out test images, the best a model can reach at this n.",
    ]
    skipped = [f"- `{r['method']}` skipped: {r['reason']}" for r in rows if r["status"] != "ok"]
    return "\n".join(["# Sampling methods", "", head, rule, *body, *notes, *skipped]) + "\n"


def fid_vs_nfe_csv(rows: list[dict[str, Any]]) -> str:
    lines = ["method,sampler,nfe,fid,fid_floor,extractor"]
    for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["nfe"]):
        lines.append(
            f"{r['method']},{r['sampler']},{r['nfe']:.6g},{r['fid']:.6g},"
            f"{r['fid_floor']:.6g},{r['extractor']}"
        )
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict[str, Any]:
    """Summarise every method; returns the summary record."""
    rows = [method_row(params, name) for name in params.methods]
    summary = {
        "extractor": params.evaluate.extractor,
        "methods": {r["method"]: r for r in rows},
        "provenance": provenance(params),
    }
    write_json(paths.SUMMARY, summary)
    write_text(paths.SUMMARY_MD, markdown(rows, params.evaluate.extractor))
    write_text(paths.FID_VS_NFE, fid_vs_nfe_csv(rows))
    print(markdown(rows, params.evaluate.extractor), end="")
    tracker = Tracker.reopen(paths.MLFLOW_RUN)
    if tracker is not None:
        tracker.log_artifact(paths.SUMMARY_MD, "reports")
        tracker.log_artifact(paths.FID_VS_NFE, "reports")
    return summary
