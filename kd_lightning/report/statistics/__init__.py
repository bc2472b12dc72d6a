"""The statistics behind every number the project reports, in numpy and scipy only.

Torch-free on purpose: the report recomputes everything from predictions copied off a cluster
(summary.json, predictions/*.csv) on machines without torch, and one implementation serves both
the run (which stores the results in summary.json) and the report, so the two cannot disagree.

Conventions
-----------
Binary: `labels` (N,) of 0/1 with 1 = positive = pneumonia; `scores` (N,) = probability of the
positive class; a case is predicted positive iff ``score > threshold`` (strictly greater, as
torchmetrics and medmnist.Evaluator do). Multi-class: `labels` (N,) in 0..K-1, `probs` and
`logits` (N, K). In both the 2- and the 3-class task class 0 is "normal", so the pneumonia score
is 1 - softmax(logits)[:, 0] (= p1 for K = 2).

What is estimated, and why this way
-----------------------------------
- AUROC is the Mann-Whitney statistic with midranks (a tied positive/negative pair counts 1/2),
  which is exactly the trapezoidal area under the empirical ROC curve (sklearn's roc_auc_score).
- Operating points are chosen on validation predictions only (Youden's J and a target
  sensitivity) and then applied unchanged to the test set, so test metrics at those thresholds
  are not optimistically biased by choosing the threshold on the data they are measured on.
- Uncertainty over test images is a stratified percentile bootstrap: positives and negatives
  are resampled separately with their counts kept, so every resample has both classes (AUROC,
  sensitivity and specificity are always defined) and the class balance of the fixed test set
  is not itself treated as random. All resamples are evaluated at once on an
  (n_resamples, N) index matrix.
- Two models on the same test images are compared with paired tests: DeLong's test for AUROC,
  the exact McNemar test for accuracy, and a paired bootstrap applying one index matrix to both
  (for K > 2, of the macro one-vs-rest AUROC, which has no DeLong test).
- Across training seeds, the per-seed paired differences are summarised with a Student t
  interval and a one-sample t-test; several comparisons are adjusted with Holm's step-down.
- Calibration is the top-label ECE (Guo et al. 2017), the Brier score and one temperature
  fitted on validation logits by minimum negative log-likelihood.

Every function checks its input and raises ValueError with one line naming the argument, the
value received and what was expected.
"""

from __future__ import annotations

from kd_lightning.report.statistics.bootstrap import (
    BOOTSTRAP_METHOD,
    bootstrap_intervals,
    stratified_bootstrap_indices,
)
from kd_lightning.report.statistics.calibration import (
    brier_score,
    calibration,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability,
    softmax,
)
from kd_lightning.report.statistics.discrimination import (
    THRESHOLD_METRICS,
    auroc,
    medmnist_acc,
    medmnist_auc,
    sensitivity_threshold,
    threshold_metrics,
    youden_threshold,
)
from kd_lightning.report.statistics.paired import (
    delong_test,
    mcnemar_test,
    paired_bootstrap,
    paired_bootstrap_accuracy,
    paired_bootstrap_auroc,
    paired_bootstrap_macro_auroc,
)
from kd_lightning.report.statistics.seeds import (
    holm,
    seed_test,
    t_interval,
    verdict,
)
from kd_lightning.report.statistics.summary import (
    run_statistics,
)

__all__ = [
    "BOOTSTRAP_METHOD",
    "THRESHOLD_METRICS",
    "auroc",
    "bootstrap_intervals",
    "brier_score",
    "calibration",
    "delong_test",
    "expected_calibration_error",
    "fit_temperature",
    "holm",
    "mcnemar_test",
    "medmnist_acc",
    "medmnist_auc",
    "negative_log_likelihood",
    "paired_bootstrap",
    "paired_bootstrap_accuracy",
    "paired_bootstrap_auroc",
    "paired_bootstrap_macro_auroc",
    "reliability",
    "run_statistics",
    "seed_test",
    "sensitivity_threshold",
    "softmax",
    "stratified_bootstrap_indices",
    "t_interval",
    "threshold_metrics",
    "verdict",
    "youden_threshold",
]
