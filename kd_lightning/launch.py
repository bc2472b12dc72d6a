"""Where a job runs inside a Hydra multirun, and what happens when the multirun ends.

* :func:`configure_trainer` (called by run.py before the Trainer is built): jobs that the joblib
  launcher runs side by side on one machine each get their own GPU, job number modulo the visible
  GPUs; with no GPU they run on CPU. It refuses Lightning's DDP subprocess launcher inside a local
  multirun, which would re-execute the whole sweep command in every extra rank, and an unknown
  trainer.precision with one line instead of Hydra's instantiation error.
* :class:`SweepTable` (a Hydra callback, conf/sweep/table.yaml): writes sweep.md / sweep.csv into
  the sweep directory when a multirun ends, one row per job, best first.

Torch and Lightning are imported lazily: the callback also runs in the process that only submits
jobs (submitit), where loading torch would cost seconds for nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from kd_lightning.report import ReportError, write_sweep_table

log = logging.getLogger(__name__)

# Launchers that run several jobs at once on this machine, so that jobs must not share one GPU.
PARALLEL_LOCAL_LAUNCHERS = ("JoblibLauncher",)
GPU_ACCELERATORS = ("auto", "gpu", "cuda")
# Lightning 2.x precision names; the first three are the ones this project documents.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
LEGACY_PRECISIONS = ("32", "16", "64", "bf16", "transformer-engine", "transformer-engine-float16")


def _multirun_launcher() -> str | None:
    """The launcher's class name when this process runs a multirun job, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1]


def _device_count(devices: Any, visible_gpus: int, on_gpu: bool) -> int:
    """How many processes Lightning would start per node for `trainer.devices`."""
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text in ("-1", "auto"):
        return visible_gpus if on_gpu else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return int(text)
    except ValueError:
        return 1


def _cluster_starts_ranks() -> bool:
    """True under SLURM tasks (srun, e.g. via submitit) or torchrun: every rank is its own
    process started by the cluster, and Lightning does not re-execute the command."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def configure_trainer(cfg: DictConfig) -> None:
    """Check `cfg.trainer.precision` and adjust `cfg.trainer` in place for the job's share of this
    machine (see module docstring).

    Only jobs of a joblib multirun whose trainer may use a GPU (accelerator auto/gpu/cuda, devices
    not already a list of GPU indices) are moved; everything else is left as configured.
    """
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS + LEGACY_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision}: expected one of {', '.join(PRECISIONS)} "
            "(32-true and bf16-mixed run on CPU; 16-mixed needs a CUDA GPU)"
        )
    launcher = _multirun_launcher()
    if launcher is None:
        return
    import torch

    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    visible = torch.cuda.device_count()
    on_gpu = accelerator in GPU_ACCELERATORS and visible > 0
    processes = _device_count(trainer.get("devices", 1), visible, on_gpu)
    strategy = str(trainer.get("strategy", "auto"))
    distributed = processes > 1 or int(trainer.get("num_nodes", 1)) > 1
    # ddp_spawn is refused too: untested under joblib/submitit workers.
    if distributed and not _cluster_starts_ranks():
        raise ValueError(
            f"trainer.strategy={strategy} with {processes} device(s) x "
            f"{trainer.get('num_nodes', 1)} node(s) inside a local multirun ({launcher}): "
            "Lightning would re-run the whole sweep in every extra rank; run DDP jobs one at a "
            "time without -m, or through SLURM (hydra/launcher=slurm_ddp, docs/scaling.md)"
        )
    if launcher not in PARALLEL_LOCAL_LAUNCHERS or accelerator not in GPU_ACCELERATORS:
        return
    if isinstance(trainer.get("devices"), (list, ListConfig)):
        return  # the user pinned GPUs explicitly
    job = int(HydraConfig.get().job.num)
    if visible:
        gpu = job % visible
        trainer.accelerator, trainer.devices = "gpu", [gpu]
        log.info("job %d of a parallel multirun: GPU %d of %d visible", job, gpu, visible)
    else:
        trainer.accelerator, trainer.devices = "cpu", 1
        log.info("job %d of a parallel multirun: no GPU visible, training on CPU", job)


class SweepTable(Callback):
    """Hydra callback: `sweep.md` and `sweep.csv` in the sweep directory after a multirun.

    Same table as `python -m kd_lightning.report SWEEP_DIR --sweep --metric METRIC`. A sweep with
    no finished job only logs a warning: the table must never turn a finished sweep into an error.
    """

    def __init__(self, metric: str = "test/auroc") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            paths = write_sweep_table([sweep_dir], sweep_dir, self.metric)
        except ReportError as err:
            log.warning("no sweep table: %s", err)
            return
        log.info("sweep table (by %s): %s", self.metric, os.fspath(paths["sweep.md"]))
