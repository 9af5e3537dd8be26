"""Stage ``report``: one table across the sampling methods in ``params.yaml``, and two trade-offs.

Writes ``metrics/summary.json``, the markdown table ``reports/summary.md``, and for ``dvc plots``
and MLflow:

* ``reports/fid_vs_nfe.csv`` (``FID_VS_NFE_HEADER``: FID and floor with their intervals, the
  verdict) and ``reports/fid_vs_nfe.png`` (error bars, the floor's interval shaded): sample
  quality against cost.
* ``reports/guidance_tradeoff.csv`` (``method,sampler,steps,guidance,fid,class_accuracy``, sorted
  by guidance) and ``reports/guidance_tradeoff.png``: classifier-free guidance (Ho & Salimans
  2022) trades diversity (FID) for class fidelity (class accuracy) as ``w`` grows. The rows are
  the *guidance families*: every method with ``guidance > 0`` and each conditional method that
  differs from it only in ``guidance`` (``w = 0`` included), scored with class accuracy.

The table shows each method's FID with its interval, its paired FID difference to
``evaluate.baseline`` with its interval and verdict (better / worse / not resolved), the floor at
the same n with its interval, KID x1000 +- std, precision/recall, density/coverage, the
near-copy fraction, the unclear share (against real images') and the verdict against real data;
then the paired verdict of every pair of methods. Paired differences come from the joint
bootstrap draws of the evaluate records (``fid_joint_draws``: the same resampled seeds and
reference images in every method's draw ``b``), by
``diffusion_core.evaluation.paired_difference``; ``metrics/compare.json`` (a DVC metric) holds
each method's difference to the baseline.

The track stage attaches the CSVs and PNGs to the MLflow run and logs ``guidance_fid`` and
``guidance_class_accuracy`` at ``step = round(100 w)`` so the UI charts the trade-off curve.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.evaluation import COMPARE_UNRESOLVED, compare, paired_difference
from pipeline import paths
from pipeline.config import Params
from pipeline.errors import StageError
from pipeline.figures import fid_vs_nfe_png, guidance_tradeoff_png
from pipeline.files import read_json, write_bytes, write_json, write_provenance, write_text
from pipeline.verdicts import VERDICT_BELOW, VERDICT_REAL, VERDICT_WORSE

# The settings that may differ inside a guidance family (the rest must match).
FAMILY_FREE_KEYS = ("guidance",)
GUIDANCE_COLUMNS = ("method", "sampler", "steps", "guidance", "fid", "class_accuracy")

FID_VS_NFE_HEADER = (
    "method,sampler,nfe,fid,fid_ci_low,fid_ci_high,fid_matched,fid_matched_n,fid_floor,"
    "fid_floor_ci_low,fid_floor_ci_high,verdict,extractor"
)
# Numbers copied from the evaluate record into the summary row.
SCORES = (
    "fid",
    "fid_ci_low",
    "fid_ci_high",
    "fid_matched",
    "fid_matched_n",
    "fid_floor",
    "fid_floor_ci_low",
    "fid_floor_ci_high",
    "kid_x1000",
    "kid_x1000_std",
    "kid_floor_x1000",
    "precision",
    "recall",
    "density",
    "coverage",
    "near_copy_fraction",
    "near_copy_fraction_heldout",
    "unclear_fraction",
    "unclear_fraction_ci_low",
    "unclear_fraction_ci_high",
    "unclear_fraction_floor",
    "class_accuracy",
    "n_images",
)
COLUMNS = (
    ("method", "method"),
    ("sampler", "sampler"),
    ("steps", "steps"),
    ("guidance", "guidance"),
    ("nfe", "NFE"),
    ("fid", "FID [CI]"),
    ("fid_diff", "ΔFID vs baseline [CI]"),
    ("vs_baseline", "vs baseline"),
    ("fid_matched", "FID at m"),
    ("fid_floor", "floor at m [CI]"),
    ("kid_x1000", "KID x1000"),
    ("precision", "P / R"),
    ("density", "D / C"),
    ("near_copy_fraction", "near copies"),
    ("unclear_fraction", "unclear [CI] (real)"),
    ("class_accuracy", "class acc."),
    ("verdict", "verdict"),
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
    scored = _read(paths.eval_record(name), "evaluate")
    ext = scored.get("extractor", params.evaluate.extractor)
    status = "ok" if sampled.get("status") == scored.get("status") == "ok" else "skipped"
    return {
        "method": name,
        "sampler": method.sampler,
        "steps": getattr(method, "steps", None),
        "guidance": method.guidance,
        "autoguidance": method.autoguidance,
        "unconditional": method.unconditional,
        "status": status,
        "reason": scored.get("reason") or sampled.get("reason"),
        "extractor": ext,
        "nfe": sampled.get("nfe"),
        **{k: scored.get(k) for k in SCORES},
        "verdict": scored.get("verdict") if status == "ok" else "skipped",
        "confidence": scored.get("confidence"),
    }


def guidance_families(params: Params, rows: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """Rows of each guidance family, keyed by the family's first guided method (params order).

    A family is the methods whose settings equal a guided method's in everything but
    ``guidance``; members need ``status: ok`` and a class accuracy (so ``unconditional``
    methods never enter). Each family is sorted by guidance, then method name.
    """
    by_name = {r["method"]: r for r in rows}

    def key(name: str) -> str:
        spec = params.methods[name].model_dump(mode="json", exclude=set(FAMILY_FREE_KEYS))
        return repr(sorted(spec.items()))

    families: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for name, method in params.methods.items():
        if method.guidance > 0 and key(name) not in families:
            families[key(name)] = (name, [])
    for name in params.methods:
        row = by_name[name]
        family = families.get(key(name))
        if family is not None and row["status"] == "ok" and row["class_accuracy"] is not None:
            family[1].append(row)
    return {
        first: sorted(members, key=lambda r: (r["guidance"], r["method"]))
        for first, members in families.values()
    }


def guidance_rows(families: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every family's rows in one list, sorted by guidance (then method name)."""
    rows = [r for members in families.values() for r in members]
    return sorted(rows, key=lambda r: (r["guidance"], r["method"]))


def guidance_tradeoff_csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(GUIDANCE_COLUMNS)]
    for r in rows:
        steps = "" if r["steps"] is None else str(r["steps"])
        lines.append(
            f"{r['method']},{r['sampler']},{steps},{r['guidance']:.6g},{r['fid']:.6g},"
            f"{r['class_accuracy']:.6g}"
        )
    return "\n".join(lines) + "\n"


def _family_label(params: Params, first: str) -> str:
    """A legend label: the sampler, its steps and the settings the family shares."""
    m = params.methods[first]
    parts = [m.sampler]
    steps = getattr(m, "steps", None)
    if steps is not None:
        parts.append(f"{steps} steps")
    parts += [f"{k}={v}" for k, v in m.settings().items()]
    if getattr(m, "spacing", "linspace") != "linspace":
        parts.append(f"spacing={m.spacing}")
    if m.clip_x0:
        parts.append("clip_x0")
    if m.classes is not None:
        parts.append(f"classes={m.classes}")
    return ", ".join(parts)


def fid_floor(rows: list[dict[str, Any]]) -> tuple[float, float, float] | None:
    """The FID floor ``(value, low, high)`` at the methods' n (every method has the same n, so
    the same floor); None when the floor was taken at fewer images (``m < n``), where drawing it
    next to FIDs at n would mislead."""
    for r in rows:
        if r["status"] == "ok" and r.get("fid_floor") is not None:
            if r.get("fid_matched_n") != r.get("n_images"):
                return None
            return r["fid_floor"], r["fid_floor_ci_low"], r["fid_floor_ci_high"]
    return None


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _interval(r: dict[str, Any], key: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{_num(r[key])} [{_num(r[f'{key}_ci_low'], 3)}, {_num(r[f'{key}_ci_high'], 3)}]"


def _signed_interval(r: dict[str, Any], key: str) -> str:
    """A difference and its interval, signed, one decimal (``-0.4 [-39.7, +38.8]``)."""
    if r.get(key) is None:
        return "-"
    if r.get("vs_baseline") == "baseline":
        return "0 (baseline)"
    return f"{r[key]:+.1f} [{r[f'{key}_ci_low']:+.1f}, {r[f'{key}_ci_high']:+.1f}]"


def _cell(r: dict[str, Any], key: str) -> str:
    if key == "guidance" and r.get("unconditional"):
        return "null label"
    if key == "guidance" and r.get("autoguidance"):
        auto = f"auto {r['autoguidance']:g}"
        return f"{r['guidance']:g} + {auto}" if r.get("guidance") else auto
    if key in ("fid", "fid_floor"):
        return _interval(r, key)
    if key == "fid_diff":
        return _signed_interval(r, key)
    if key == "fid_matched":
        if r.get(key) is None:
            return "-"
        return f"{_num(r[key])} (m = {r['fid_matched_n']:.0f})"
    if key == "kid_x1000":
        return "-" if r.get(key) is None else f"{r[key]:.3g} +- {r['kid_x1000_std']:.2g}"
    if key == "precision":
        return "-" if r.get(key) is None else f"{r['precision']:.2f} / {r['recall']:.2f}"
    if key == "density":
        return "-" if r.get(key) is None else f"{r['density']:.2f} / {r['coverage']:.2f}"
    if key == "near_copy_fraction":
        return "-" if r.get(key) is None else f"{r[key]:.3f}"
    if key == "unclear_fraction":
        if r.get(key) is None:
            return "-"
        return (f"{r[key]:.3f} [{r[f'{key}_ci_low']:.3f}, {r[f'{key}_ci_high']:.3f}] "
                f"({r[f'{key}_floor']:.3f})")
    value = r.get(key)
    return _num(value) if isinstance(value, float) else ("-" if value is None else str(value))


def _joint(record: dict[str, Any]) -> tuple[Any, list[float]] | None:
    draws = record.get("fid_joint_draws")
    if record.get("status") != "ok" or not draws or record.get("fid") is None:
        return None
    return repr(sorted(record.get("joint_plan", {}).items())), draws


def paired_comparisons(params: Params, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Paired FID differences from the evaluate records' joint bootstrap draws.

    ``vs_baseline[m]``: ``fid_diff`` = FID(m) - FID(baseline) with ``fid_diff_ci_low``/``_high``
    (level ``evaluate.confidence``), ``fid_diff_shared`` (the share of the unpaired variance that
    pairing cancels) and ``vs_baseline`` (better / worse / not resolved / baseline);
    ``pairs[a][b]``: the verdict on ``a`` against ``b``. Methods whose draws came from another
    plan (another n, seed or reference) or that were skipped are left out.
    """
    baseline = params.evaluate.baseline_of(params.methods)
    level = params.evaluate.confidence
    joint = {name: j for name, rec in records.items() if (j := _joint(rec)) is not None}

    def diff(a: str, b: str) -> Any:
        if a not in joint or b not in joint or joint[a][0] != joint[b][0]:
            return None
        return paired_difference(records[a]["fid"], records[b]["fid"], joint[a][1], joint[b][1],
                                 level)

    vs_baseline: dict[str, dict[str, Any]] = {}
    for name in records:
        d = diff(name, baseline)
        if d is None:
            continue
        vs_baseline[name] = {
            "fid_diff": d.value, "fid_diff_ci_low": d.low, "fid_diff_ci_high": d.high,
            "fid_diff_shared": d.shared,
            "vs_baseline": "baseline" if name == baseline else compare(d),
        }
    pairs = {a: {b: compare(d) for b in joint if b != a and (d := diff(a, b)) is not None}
             for a in joint}
    return {"baseline": baseline, "confidence": level, "vs_baseline": vs_baseline,
            "pairs": pairs}


PAIR_MARKS = {"better": "<", "worse": ">", COMPARE_UNRESOLVED: "·"}


def pairs_table(pairs: dict[str, dict[str, str]]) -> list[str]:
    """The paired verdicts as a square table: row ``a``, column ``b``: ``<`` (``a`` has the lower
    FID, resolved), ``>`` (higher, resolved) or ``·`` (not resolved)."""
    names = list(pairs)
    if len(names) < 2:
        return []
    lines = ["| | " + " | ".join(f"`{b}`" for b in names) + " |",
             "|---|" + "|".join("---" for _ in names) + "|"]
    for a in names:
        cells = ["" if a == b else PAIR_MARKS[pairs[a].get(b, COMPARE_UNRESOLVED)] for b in names]
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], extractor: str,
             comparisons: dict[str, Any] | None = None) -> str:
    """A markdown table of ``rows``, the paired verdicts between methods and the metric
    definitions."""
    comparisons = comparisons or {"baseline": None, "pairs": {}}
    baseline = comparisons["baseline"]
    titles = {"fid_diff": f"ΔFID vs {baseline} [CI]", "vs_baseline": f"vs {baseline}"}
    head = "| " + " | ".join(titles.get(key, title) for key, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    level = f"{100 * ok[0]['confidence']:.0f} %" if ok and ok[0].get("confidence") else "95 %"
    n = ok[0].get("n_images") if ok else None
    matrix = pairs_table(comparisons["pairs"])
    notes = [
        "",
        f"Paired verdicts at n = {n}: row against column, `<` lower FID (better), `>` higher "
        f"(worse), `·` not resolved; from the {level} interval of the paired FID difference "
        "(a joint bootstrap of the shared seeds and the reference)."
        if matrix
        else "",
        "",
        *matrix,
        "",
        f"FID, KID, P/R and D/C use the `{extractor}` feature extractor against the reference",
        "half R of the held-out images (seen by neither the model nor the extractor); FID [CI] at",
        f"n, for R as drawn. ΔFID: FID minus the baseline's ({baseline}), with the interval of",
        "a joint bootstrap that resamples the seeds both methods share and the reference once",
        "for both; its verdict says better or worse only where that interval excludes 0.",
        "NFE: network evaluations per image (classifier-free guidance and autoguidance: 2 per",
        "denoiser call). The floor is what m = min(n, |F|) real images of the other half F",
        "score against R; its interval is where such an FID lands. Verdict: the FID of m",
        "samples (FID at m) inside the floor's interval = indistinguishable from real data at",
        "this n. KID on standardised features;",
        "near copies: share of samples closer to a training image than 5 % of held-out ones.",
        "unclear: share of samples the evaluation classifier labels with a top probability",
        "below evaluate.unclear_below (ambiguous or malformed), Wilson interval; in brackets",
        "the same share for the m real images of F.",
    ]
    if any(r.get("unconditional") for r in rows):
        notes += [
            "",
            "Guidance `null label`: an `unconditional` method, the conditional network sampled",
            "with its null label (no class labels, so no class accuracy).",
        ]
    skipped = [f"- `{r['method']}` skipped: {r['reason']}" for r in rows if r["status"] != "ok"]
    return "\n".join(["# Sampling methods", "", head, rule, *body, *notes, *skipped]) + "\n"


README_START = "<!-- results table: generated by `diffusion readme-table` from metrics/summary.json -->"
README_END = "<!-- end of results table -->"
_VERDICT_WORDS = {VERDICT_REAL: "real-like", VERDICT_WORSE: "worse than real",
                  VERDICT_BELOW: "below real"}


def readme_table(summary: dict[str, Any]) -> str:
    """The results table of the README, from ``metrics/summary.json``: per method its sampler,
    NFE, FID with its interval, the paired difference to the baseline with its interval and
    verdict, class accuracy and the verdict against real data."""
    baseline = summary.get("baseline")
    rows = list(summary["methods"].values())
    n = next((r["n_images"] for r in rows if r.get("n_images")), None)
    lines = [
        f"| method | sampler | steps | guidance | NFE | FID [95 % CI] (n = {n}) | "
        f"ΔFID vs `{baseline}` [95 % CI] | vs `{baseline}` | class acc. | against real data |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| `{r['method']}` | {r['sampler']} | skipped: {r['reason']} "
                         "| | | | | | | |")
            continue
        accuracy = "-" if r.get("class_accuracy") is None else f"{100 * r['class_accuracy']:.1f} %"
        fid = f"{r['fid']:.1f} [{r['fid_ci_low']:.1f}, {r['fid_ci_high']:.1f}]"
        cells = [f"`{r['method']}`", r["sampler"], _cell(r, "steps"), _cell(r, "guidance"),
                 _num(r.get("nfe")), fid, _signed_interval(r, "fid_diff"),
                 r.get("vs_baseline") or "-", accuracy,
                 _VERDICT_WORDS.get(r.get("verdict"), str(r.get("verdict")))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme_table(readme: Any, summary_path: Any = paths.SUMMARY) -> bool:
    """Replace the block between :data:`README_START` and :data:`README_END` of ``readme`` with
    :func:`readme_table` of ``summary_path``; returns whether the file changed."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise StageError(f"{readme}: no results block (the lines {README_START!r} and "
                         f"{README_END!r})")
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    new = f"{head}{README_START}\n{readme_table(_read(summary_path, 'report'))}{README_END}{tail}"
    if new != text:
        write_text(readme, new)
    return new != text


def fid_vs_nfe_csv(rows: list[dict[str, Any]]) -> str:
    lines = [FID_VS_NFE_HEADER]
    keys = ("nfe", "fid", "fid_ci_low", "fid_ci_high", "fid_matched", "fid_matched_n")
    keys += ("fid_floor", "fid_floor_ci_low", "fid_floor_ci_high")
    for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["nfe"]):
        numbers = ",".join(f"{r[k]:.6g}" for k in keys)
        lines.append(f"{r['method']},{r['sampler']},{numbers},{r['verdict']},{r['extractor']}")
    return "\n".join(lines) + "\n"


def prune_removed_methods(params: Params) -> list[str]:
    """Delete the grids, metrics, provenance and timings of methods removed from params.yaml,
    so that neither this report, `dvc plots show` nor MLflow shows them again."""
    stale = paths.stale_method_files(set(params.methods))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} file(s) of methods no longer in params: "
              + ", ".join(sorted({p.stem.partition("@")[2] or p.stem for p in stale})))
    return [str(p) for p in stale]


def run(params: Params) -> dict[str, Any]:
    """Summarise every method; returns the summary record."""
    prune_removed_methods(params)
    rows = [method_row(params, name) for name in params.methods]
    records = {name: read_json(paths.eval_record(name)) for name in params.methods}
    comparisons = paired_comparisons(params, records)
    for row in rows:
        row.update(comparisons["vs_baseline"].get(row["method"], {}))
    families = guidance_families(params, rows)
    tradeoff = guidance_rows(families)
    family_of = {r["method"]: first for first, members in families.items() for r in members}
    summary = {
        "extractor": params.evaluate.extractor,
        "baseline": comparisons["baseline"],
        "methods": {r["method"]: r for r in rows},
        "pairs": comparisons["pairs"],
        "guidance_tradeoff": [
            {**{k: r[k] for k in GUIDANCE_COLUMNS}, "family": family_of[r["method"]]}
            for r in tradeoff
        ],
    }
    floor, n = fid_floor(rows), params.sample.n_images
    ok = [r for r in rows if r["status"] == "ok"]
    # FID against NFE compares samplers: guided and null-label methods have their own plot
    unguided = [
        r
        for r in ok
        if params.methods[r["method"]].guidance == 0
        and not params.methods[r["method"]].unconditional
    ]
    labelled = {_family_label(params, k): members for k, members in families.items() if members}
    write_json(paths.SUMMARY, summary)
    write_json(paths.COMPARE, {
        name: {k: v for k, v in values.items() if k != "fid_diff_shared"}
        for name, values in comparisons["vs_baseline"].items()})
    write_provenance("report", params)
    text = markdown(rows, params.evaluate.extractor, comparisons)
    write_text(paths.SUMMARY_MD, text)
    write_text(paths.FID_VS_NFE, fid_vs_nfe_csv(unguided))
    write_text(paths.GUIDANCE_TRADEOFF, guidance_tradeoff_csv(tradeoff))
    write_bytes(paths.FID_VS_NFE_PNG, fid_vs_nfe_png(unguided, floor, n))
    write_bytes(paths.GUIDANCE_TRADEOFF_PNG, guidance_tradeoff_png(labelled, floor, n))
    print(text, end="")
    return summary
