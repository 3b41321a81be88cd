"""Output-length predictor (imports as `inlaid.predictor`): numpy / scikit-learn only.

`LengthPredictor` (hashed task + prompt features, ridge on log length), `TaskMeanPredictor`
(the per-task mean baseline), `OnlineLengthPredictor` (learns from finished requests with
bounded memory, refits off the caller's thread, saves and loads its state) and
`evaluate_predictions` / `evaluate_report` (MAE, bucket accuracy, Kendall's tau, Spearman per task).
"""

from inlaid.predictor.evaluate import evaluate_predictions, evaluate_report, length_bucket
from inlaid.predictor.features import FeatureHasher
from inlaid.predictor.model import LengthPredictor, LengthSample, TaskMeanPredictor
from inlaid.predictor.online import OnlineLengthPredictor, PredictorStateError, TokenizerIdentity

__all__ = [
    "FeatureHasher",
    "LengthPredictor",
    "LengthSample",
    "OnlineLengthPredictor",
    "PredictorStateError",
    "TokenizerIdentity",
    "TaskMeanPredictor",
    "evaluate_predictions",
    "evaluate_report",
    "length_bucket",
]
