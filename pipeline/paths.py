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
MLFLOW_RUN = TRAIN_DIR / "mlflow_run.json"
TRAIN_METRICS = Path("metrics/train.json")

SUMMARY = Path("metrics/summary.json")
SUMMARY_MD = Path("reports/summary.md")
FID_VS_NFE = Path("reports/fid_vs_nfe.csv")
FID_VS_NFE_PNG = Path("reports/fid_vs_nfe.png")
GUIDANCE_TRADEOFF = Path("reports/guidance_tradeoff.csv")
GUIDANCE_TRADEOFF_PNG = Path("reports/guidance_tradeoff.png")


def samples_dir(method: str) -> Path:
    """``samples.pt`` (uint8 images, labels, seeds) of one method."""
    return Path("runs/samples") / method


def grid_path(method: str) -> Path:
    """The image grid of one method (a DVC image plot)."""
    return Path("reports/grids") / f"{method}.png"


def sample_metrics(method: str) -> Path:
    return Path("metrics/sample") / f"{method}.json"


def eval_metrics(method: str) -> Path:
    return Path("metrics/eval") / f"{method}.json"
