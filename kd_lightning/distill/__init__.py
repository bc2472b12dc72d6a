"""Plain-torch distillation pieces: NST and KD losses, feature hooks (no Lightning, no Hydra)."""

from kd_lightning.distill.hooks import FeatureHooks, MissingFeatureError
from kd_lightning.distill.losses import KDLoss, NSTLoss, choose_poly_form, nst_mmd2

__all__ = [
    "FeatureHooks",
    "KDLoss",
    "MissingFeatureError",
    "NSTLoss",
    "choose_poly_form",
    "nst_mmd2",
]
