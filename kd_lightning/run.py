"""One stage: build the datamodule, module and Trainer from the config, fit, test the best
checkpoint, and write `summary.json` into the run directory."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import (
    CHECKPOINT_DIR,
    EPOCH_TEST_FILE,
    LAST_CHECKPOINT,
    MODEL_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    has_predictions,
    read_json,
    read_summary,
    summary_path,
    write_bytes_atomic,
    write_json_atomic,
)
from kd_lightning.callbacks import build_callbacks
from kd_lightning.checks import (
    check_checkpoint_file,
    check_evaluation_config,
    check_numbers,
    check_teacher_data,
    check_trainer_config,
)
from kd_lightning.guards import AtomicCheckpointIO, FiniteLossGuard, ResumeRngState
from kd_lightning.launch import configure_trainer
from kd_lightning.locks import directory_lock
from kd_lightning.models.backbones import check_image_size, count_parameters
from kd_lightning.predict import write_run_predictions
from kd_lightning.report.statistics import run_statistics

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"image_size": 32}} -> {"data.image_size": 32}: one column per setting in W&B."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def save_run_config(cfg: DictConfig, out_dir: Path) -> None:
    """run_config.yaml: what this run was built from (a chain step has no .hydra/ of its own)."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime: keep it unresolved
        text = OmegaConf.to_yaml(cfg)
    write_bytes_atomic(out_dir / RUN_CONFIG_FILE, text.encode())


def evaluate_predictions(cfg: DictConfig, predictions: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `statistics`: intervals, validation-chosen operating points, calibration."""
    evaluation = cfg.get("evaluation") or {}
    (val_labels, val_logits), (test_labels, test_logits) = predictions["val"], predictions["test"]
    return run_statistics(
        val_labels,
        val_logits,
        test_labels,
        test_logits,
        target_sensitivity=float(evaluation.get("target_sensitivity", 0.95)),
        n_resamples=int(evaluation.get("bootstrap_resamples", 2000)),
        seed=int(evaluation.get("bootstrap_seed", 0)),
        n_bins=int(evaluation.get("calibration_bins", 15)),
    )


def backfill_predictions(cfg: DictConfig, out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A run finished before predictions existed: write them from its model.pt (the best
    checkpoint's network) and add the statistics to summary.json; nothing else changes."""
    from kd_lightning.models.loading import load_run_network

    print(f"[kd_lightning] {out_dir}: writing per-image predictions of its {MODEL_FILE}")
    if not (out_dir / RUN_CONFIG_FILE).is_file():
        save_run_config(cfg, out_dir)
    net, _ = load_run_network(out_dir, summary)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    summary = {
        **summary,
        "statistics": evaluate_predictions(cfg, write_run_predictions(net, datamodule, out_dir)),
    }
    write_json_atomic(summary_path(out_dir), summary)
    return summary


def run_stage(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """Train and test one model; return (and write) its summary. A finished run only reports.
    One process at a time per run directory (kd_lightning.locks)."""
    out_dir = Path(out_dir) if out_dir is not None else run_dir()
    with directory_lock(out_dir, "run directory"):
        return _run_stage(cfg, out_dir)


def _run_stage(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    finished = read_summary(out_dir)
    if finished is not None:
        print(f"[kd_lightning] {out_dir} already finished; reporting its {SUMMARY_FILE}")
        if not has_predictions(out_dir) or "statistics" not in finished:
            finished = backfill_predictions(cfg, out_dir, finished)
        return finished

    configure_trainer(cfg)  # precision check; parallel multirun jobs get a GPU each (launch.py)
    check_trainer_config(cfg.trainer)
    check_image_size(
        int(cfg.data.image_size),
        str(cfg.model.get("stem", "imagenet")),
        OmegaConf.to_container(cfg.model, resolve=True),
    )
    check_evaluation_config(cfg.get("evaluation"))
    check_numbers(cfg)
    check_teacher_data(cfg)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    last = ckpt_dir / LAST_CHECKPOINT
    resume_from = str(last) if cfg.get("resume", True) and last.is_file() else None
    if resume_from:
        check_checkpoint_file(
            last,
            "checkpoint",
            f"move it away to restart {out_dir} from scratch, or rerun with resume=false",
        )
    save_run_config(cfg, out_dir)
    L.seed_everything(int(cfg.seed), workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    weights = datamodule.class_weights
    module = instantiate(
        cfg.module, class_weights=weights.tolist() if weights is not None else None
    )

    # conf/callbacks: the best checkpoint, the epoch timer and any added with +callbacks=...
    callbacks, checkpoint, timer = build_callbacks(cfg, ckpt_dir)
    if resume_from:
        keep_earlier_metrics(out_dir)
    logger = instantiate(cfg.logger, save_dir=str(out_dir)) if cfg.get("logger") else False
    callbacks = [*callbacks, FiniteLossGuard(last), ResumeRngState()]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(out_dir),
        plugins=[AtomicCheckpointIO()],
    )
    if logger:
        logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))

    if resume_from:
        print(f"[kd_lightning] resuming {out_dir} from {last}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - started

    best = checkpoint.best_model_path or str(last)
    check_checkpoint_file(
        Path(best),
        "best checkpoint",
        f"restore it, or move {out_dir} away and rerun to retrain (resume=false)",
    )
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    # DDP: only global rank 0 writes model.pt, artifacts and summary.json (ranks writing one file
    # at once can corrupt it); the other ranks receive the same summary from rank 0.
    summary = None
    if trainer.is_global_zero:
        summary = build_summary(cfg, module, results[0] if results else {}, best, out_dir)
        summary["data"]["labeled_fraction"] = float(datamodule.labeled_fraction)
        summary["data"]["labeled_counts"] = datamodule.labeled_counts
        summary["data"]["train_counts"] = datamodule.train_counts
        # The best checkpoint's weights are in `module` after trainer.test.
        summary["statistics"] = evaluate_predictions(
            cfg, write_run_predictions(module, datamodule, out_dir)
        )
        summary.update(
            {
                "epochs": int(trainer.current_epoch),
                "fit_seconds": round(fit_seconds, 2),
                "seconds_per_epoch": round(sum(timer.seconds) / len(timer.seconds), 2)
                if timer.seconds
                else None,
                "best_val": {cfg.checkpoint.monitor: _as_float(checkpoint.best_model_score)},
            }
        )
        epoch_test = out_dir / EPOCH_TEST_FILE  # +callbacks=epoch_test (convergence curves)
        if epoch_test.is_file():
            summary["epoch_test"] = read_json(epoch_test, "per-epoch test metrics")
        write_json_atomic(summary_path(out_dir), summary)
        print_summary(summary)
        log_statistics(logger, summary, out_dir)
    summary = trainer.strategy.broadcast(summary, src=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Without this, gloo processes sometimes abort at exit (seen in 2 of 19 trainer=ddp_cpu
        # runs); tests/integration/test_ddp.py runs this path.
        torch.distributed.destroy_process_group()
    return summary


def keep_earlier_metrics(out_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing logs/metrics.csv when a new run starts in the
    same directory; a resumed run first renames it to metrics.before-resume-<n>.csv."""
    metrics = out_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        return
    n = 1
    while (target := metrics.with_name(f"metrics.before-resume-{n}.csv")).exists():
        n += 1
    os.replace(metrics, target)


def log_statistics(logger: Any, summary: dict[str, Any], out_dir: Path) -> None:
    """W&B: the statistics as summary metrics of the run (`stats/...` keys) and this run's ROC,
    reliability diagram and confusion matrix (from its predictions files) as images."""
    if type(logger).__name__ != "WandbLogger":
        return
    from PIL import Image

    from kd_lightning.report import figures, trust

    stats = summary["statistics"]
    flat = {
        f"stats/{k}": v
        for k, v in flatten(stats).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    logger.experiment.summary.update(flat)
    run = {"dir": out_dir, "seed": summary["seed"], "summary": summary}
    trust.attach_predictions([run], {})
    run["stats"] = stats  # the run's own settings (attach_predictions used the defaults)
    row = {"method": summary["name"], "config": "", "runs": [run]}
    for key, figure in (
        ("roc", figures.roc_figure([row])),
        ("calibration", figures.calibration_figure([row], n_bins=stats["calibration"]["n_bins"])),
        ("confusion", figures.confusion_figure([row])),
    ):
        image = Image.open(io.BytesIO(figures.png_bytes(figure)))
        logger.log_image(key=f"stats/{key}", images=[image])


def build_summary(
    cfg: DictConfig,
    module: L.LightningModule,
    test_metrics: dict[str, float],
    best_checkpoint: str,
    out_dir: Path,
) -> dict[str, Any]:
    model_file = out_dir / MODEL_FILE
    # The student alone, weights of the best checkpoint: what a user deploys, and what "size" means.
    buffer = io.BytesIO()
    torch.save(module.deployable_state_dict(), buffer)
    write_bytes_atomic(model_file, buffer.getvalue())
    artifacts = module.write_artifacts(out_dir)
    return {
        **artifacts,
        "name": cfg.name,
        "method": cfg.method,
        "role": cfg.role,
        "seed": int(cfg.seed),
        "variant": dict(cfg.get("variant") or {}),
        "model": {
            **OmegaConf.to_container(cfg.model, resolve=True),
            "num_classes": module.hparams.num_classes,
        },
        "teacher": getattr(module, "teacher_source", None),
        "test": {k: float(v) for k, v in sorted(test_metrics.items())},
        "test_confusion_matrix": getattr(module, "test_confusion", None),
        "best_checkpoint": str(Path(best_checkpoint).resolve()),
        "model_file": str(model_file.resolve()),
        "model_file_mb": round(model_file.stat().st_size / 2**20, 3),
        "parameters": count_parameters(module.model),
        "data": {
            "path": str(cfg.data.path),
            "image_size": int(cfg.data.image_size),
            "num_classes": int(cfg.data.num_classes),
            "in_channels": int(cfg.data.in_channels),
            "mean": float(cfg.data.mean),
            "std": float(cfg.data.std),
            "clahe": bool(cfg.data.clahe),
        },
        "run_dir": str(out_dir.resolve()),
    }


def _as_float(value: Any) -> float | None:
    return float(value) if value is not None else None


def print_summary(summary: dict[str, Any]) -> None:
    metrics = "  ".join(
        f"{k}={v:.4f}" for k, v in summary["test"].items() if not k.endswith("loss")
    )
    print(
        f"[kd_lightning] {summary['name']} ({summary['model']['arch']}, "
        f"{summary['parameters'] / 1e6:.1f}M params): {metrics}"
    )
    for line in statistics_lines(summary.get("statistics")):
        print(f"[kd_lightning]   {line}")


def statistics_lines(stats: dict[str, Any] | None) -> list[str]:
    """The per-run statistics as a few readable lines (percent, 95% intervals)."""
    if not stats:
        return []

    def ci(item: dict[str, float]) -> str:
        return f"{100 * item['value']:.2f} [{100 * item['low']:.2f}, {100 * item['high']:.2f}]"

    test = stats["test"]
    multiclass = stats.get("multiclass")
    # K > 2: the set's own headline first; the AUROC and thresholds below are then of the binary
    # collapse class 0 vs rest (score 1 - p(class 0)), and say so.
    collapse = " (class 0 vs rest)" if multiclass else ""
    lines = []
    if multiclass:
        lines.append(
            f"test {stats['n_classes']}-class: top-1 ACC {ci(multiclass['acc'])}  macro AUROC "
            f"{ci(multiclass['auroc_macro'])} (95% {test['method']}, "
            f"{test['n_resamples']} resamples)"
        )
    lines.append(
        f"test AUROC{collapse} {ci(test['auroc'])} (95% {test['method']}, "
        f"{test['n_resamples']} resamples)"
    )
    for name, threshold in stats["thresholds"].items():
        point = test[name]
        lines.append(
            f"threshold{collapse} {name} = {threshold:.4f} "
            f"({'fixed' if name == '0.5' else 'from validation'})"
            f": ACC {ci(point['acc'])}  "
            f"sens {ci(point['sensitivity'])}  spec {ci(point['specificity'])}  "
            f"F1 {ci(point['f1'])}"
        )
    cal = stats["calibration"]
    lines.append(
        f"calibration ({cal['n_bins']} bins): ECE {100 * cal['ece']:.2f}%  Brier "
        f"{cal['brier']:.4f}; after temperature T={cal['temperature']:.3f} fitted on "
        f"validation: ECE {100 * cal['ece_scaled']:.2f}%  Brier {cal['brier_scaled']:.4f}"
    )
    return lines
