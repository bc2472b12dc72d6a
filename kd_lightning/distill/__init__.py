"""Plain-torch distillation pieces: NST and KD losses, the methods NST is compared with (FitNets,
AT, DKD, RKD, CRD), feature hooks (no Lightning, no Hydra)."""

from kd_lightning.distill.crd import CRDLoss
from kd_lightning.distill.dkd import DKDLoss
from kd_lightning.distill.feature import ATLoss, FitNetsLoss
from kd_lightning.distill.hooks import FeatureHooks, MissingFeatureError
from kd_lightning.distill.kd import KDLoss
from kd_lightning.distill.methods import DistillInputs, DistillMethod
from kd_lightning.distill.nst import NSTLoss, choose_poly_form, nst_mmd2
from kd_lightning.distill.rkd import RKDLoss

__all__ = [
    "ATLoss",
    "CRDLoss",
    "DKDLoss",
    "DistillInputs",
    "DistillMethod",
    "FeatureHooks",
    "FitNetsLoss",
    "KDLoss",
    "MissingFeatureError",
    "NSTLoss",
    "RKDLoss",
    "choose_poly_form",
    "nst_mmd2",
]
