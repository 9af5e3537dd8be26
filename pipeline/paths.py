"""Where each stage reads and writes, relative to the directory DVC runs the stage in.

``dvc.yaml`` names the same paths; keep the two in step.
"""

from pathlib import Path

PARAMS_OK = Path("runs/params.ok")  # the `check` stage's output; every other stage needs it

PREPARED = Path("data/prepared")
TRAIN_DATA = PREPARED / "train.pt"
TEST_DATA = PREPARED / "test.pt"
DATA_INFO = PREPARED / "info.json"

CLASSIFIER = Path("models/classifier.pt")
REFERENCE_FEATURES = Path("models/reference_features.pt")
CLASSIFIER_METRICS = Path("metrics/classifier.json")

TRAIN_DIR = Path("runs/train")
CHECKPOINTS = TRAIN_DIR / "checkpoints"
STALE = TRAIN_DIR / "stale"  # other configs' and unreadable checkpoints: not DVC-cached
MODEL = TRAIN_DIR / "model.pt"
LOSS_CSV = TRAIN_DIR / "loss.csv"
TRAIN_METRICS = Path("metrics/train.json")

DISTILL_DIR = Path("runs/distill")  # student_<k>.pt and the round checkpoint (DVC-cached)
DISTILL_CHECKPOINT = DISTILL_DIR / "checkpoint.pt"
DISTILL_SKIPPED = DISTILL_DIR / "skipped.json"
DISTILL_METRICS = Path("metrics/distill.json")

SUMMARY = Path("metrics/summary.json")
COMPARE = Path("metrics/compare.json")
SUMMARY_MD = Path("reports/summary.md")
FID_VS_NFE = Path("reports/fid_vs_nfe.csv")
FID_VS_NFE_PNG = Path("reports/fid_vs_nfe.png")
GUIDANCE_TRADEOFF = Path("reports/guidance_tradeoff.csv")
GUIDANCE_TRADEOFF_PNG = Path("reports/guidance_tradeoff.png")


def student_path(steps: int) -> Path:
    """The distilled student of ``steps`` sampling steps, a model file like ``MODEL``."""
    return DISTILL_DIR / f"student_{steps}.pt"


def samples_dir(method: str) -> Path:
    """``samples.pt`` (uint8 images, labels, seeds) of one method."""
    return Path("runs/samples") / method


def grid_path(method: str) -> Path:
    """The image grid of one method (a DVC image plot)."""
    return Path("reports/grids") / f"{method}.png"


def sample_metrics(method: str) -> Path:
    return Path("metrics/sample") / f"{method}.json"


#: the evaluate stage's outputs: one file per method in each
EVAL_METRICS = Path("metrics/eval")
EVAL_RECORDS = Path("reports/eval")


def eval_metrics(method: str) -> Path:
    return EVAL_METRICS / f"{method}.json"


def eval_record(method: str) -> Path:
    """The full evaluation record of one method (intervals, P/R, D/C, verdict, ...)."""
    return EVAL_RECORDS / f"{method}.json"


def method_files(method: str) -> list[Path]:
    """The small per-method files kept in Git (and the timings beside them)."""
    return [
        grid_path(method),
        sample_metrics(method),
        eval_metrics(method),
        eval_record(method),
        Path("provenance") / f"sample@{method}.json",
        Path("runs/timing") / f"sample@{method}.json",
    ]


def stale_method_files(configured: set[str]) -> list[Path]:
    """Per-method files of methods no longer in ``params.yaml`` (their stages are gone)."""
    found = {p.stem for p in Path("reports/grids").glob("*.png")}
    for folder in (Path("metrics/sample"), EVAL_METRICS):
        found |= {p.stem for p in folder.glob("*.json")}
    return [f for m in sorted(found - configured) for f in method_files(m) if f.exists()]
