"""Scale on this CPU, for real: a distillation run under DDP with 2 gloo processes (synced test
metrics equal a recomputation from model.pt; files written once), bf16 mixed precision with the
NST term in float32, channels_last, and one-line errors for trainer options that cannot work."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.conf_path import config_dir
from kd_lightning.launch import configure_trainer
from kd_lightning.models.backbones import build_resnet
from kd_lightning.modules.metrics import StageMetrics
from tests.cli import TINY, run_cli
from tests.integration.test_sweeps import ENV, logged_hparam, tiny_teacher

# Test images for the DDP run: 64 = 2 ranks x 2 batches x 16, so Lightning's DistributedSampler
# adds no padding duplicates and the synced metrics must equal the single-process ones exactly.
EVAL_IMAGES = 64
METRICS = ("test/acc", "test/auroc", "test/f1", "test/sensitivity", "test/specificity")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, shared_npz: Path) -> Path:
    return tiny_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> tuple[Path, str]:
    """NST-poly + KD student, 2 CPU processes (gloo), the whole 64-image test subset."""
    cwd = tmp_path_factory.mktemp("ddp")
    budget = [a for a in TINY if not a.startswith("trainer.limit_test_batches")]
    proc = run_cli(
        ["+experiment=nst_poly_kd", "trainer=ddp_cpu", f"module.teacher={teacher}", *budget]
        + [f"data.eval_subset={EVAL_IMAGES}", "hydra.run.dir=ddp"],
        cwd=cwd,
        **ENV,
    )
    return cwd / "ddp", proc.stdout + proc.stderr


def _metrics_csv(run: Path) -> list[dict[str, str]]:
    with (run / "logs" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _logged(run: Path, key: str) -> list[float]:
    return [float(row[key]) for row in _metrics_csv(run) if row.get(key)]


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_ddp_runs_two_ranks_and_writes_files_once(ddp_run: tuple[Path, str]) -> None:
    run, output = ddp_run
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output and "distributed_backend=gloo" in output
    # Lightning re-ran the command for rank 1 in the same run dir (its own log, no .hydra copy).
    assert (run / "train_ddp_process_1.log").is_file()
    # One summary line printed, one of each file written (rank 0 only), nothing half-written.
    assert output.count("[kd_lightning] nst_poly_kd (") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best-epoch=000.ckpt",
        "last.ckpt",
    ]
    assert not list(run.rglob("*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_file_mb"] == pytest.approx(
        (run / "model.pt").stat().st_size / 2**20, abs=1e-3
    )
    # Each rank distilled from its own teacher copy: both loss terms were computed and finite.
    for key in ("train/nst_layer4", "train/kd", "train/ce"):
        values = _logged(run, key)
        assert values and all(math.isfinite(v) for v in values), key


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_ddp_test_metrics_cover_the_whole_split_once(ddp_run: tuple[Path, str]) -> None:
    run, _ = ddp_run
    summary = json.loads((run / "summary.json").read_text())
    # Each rank saw 32 images; the synced confusion matrix counts all 64 once.
    assert sum(map(sum, summary["test_confusion_matrix"])) == EVAL_IMAGES
    # Recompute on one process from the saved student weights and the run's own data config.
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    spec = {**OmegaConf.to_container(cfg.model, resolve=True), "weights_path": None}
    model = build_resnet(num_classes=2, **{**spec, "pretrained": False})
    model.load_state_dict(torch.load(run / "model.pt", map_location="cpu"))
    model.eval()
    metrics = StageMetrics("test", 2)
    with torch.no_grad():
        for images, targets in datamodule.test_dataloader():
            metrics.update(model(images), targets)
    expected = metrics.compute()
    for key in METRICS:
        assert summary["test"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert summary["test_confusion_matrix"] == metrics.confusion_matrix()
    # test/loss is not compared: ClassifierModule logs it without sync_dist, so under DDP it is
    # rank 0's half only (torchmetrics metrics above sync on compute()).


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    cwd = tmp_path_factory.mktemp("bf16")
    run_cli(
        ["+experiment=nst_poly_kd", f"module.teacher={teacher}", "trainer.precision=bf16-mixed"]
        + ["module.channels_last=true", *TINY, "hydra.run.dir=bf16"],
        cwd=cwd,
        **ENV,
    )
    return cwd / "bf16"


def test_bf16_distillation_run_is_finite(bf16_run: Path) -> None:
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert all(math.isfinite(v) for v in summary["test"].values()), summary["test"]
    assert logged_hparam(bf16_run, "trainer.precision") == "bf16-mixed"
    assert logged_hparam(bf16_run, "module.channels_last") is True
    nst = _logged(bf16_run, "train/nst_layer4")
    assert nst and all(math.isfinite(v) and v > 0 for v in nst)


# The CLI silences these two (kd_lightning/console.py); in-process Lightning prints them.
@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")
def test_bf16_autocast_keeps_nst_in_float32(bf16_run: Path) -> None:
    """The run's own module under Lightning's bf16-mixed plugin for one real batch: the student's
    maps are bf16 and channels_last, the NST term float32."""
    cfg = OmegaConf.load(bf16_run / ".hydra" / "config.yaml")
    module = instantiate(cfg.module, class_weights=None)
    datamodule = instantiate(cfg.data, train_subset=16, eval_subset=16)
    seen: dict[str, torch.Tensor] = {}
    module.model.layer1.register_forward_hook(lambda m, i, out: seen.setdefault("layer1", out))
    module.nst.register_forward_hook(lambda m, i, out: seen.setdefault("nst", out.detach()))
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert seen["layer1"].dtype == torch.bfloat16
    assert seen["layer1"].is_contiguous(memory_format=torch.channels_last)
    assert not seen["layer1"].is_contiguous()
    assert seen["nst"].dtype == torch.float32 and torch.isfinite(seen["nst"]).all()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_documented_precisions_pass_the_check(precision: str) -> None:
    configure_trainer(_compose([f"trainer.precision={precision}"]))


def test_unknown_precision_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"trainer.precision=fp8: expected one of 32-true, bf16"):
        configure_trainer(_compose(["trainer.precision=fp8"]))


@pytest.mark.slow  # CI runs it (make test-slow); make test stays under 10 min
def test_ddp_inside_a_local_multirun_is_refused(tmp_path: Path) -> None:
    proc = run_cli(
        ["-m", "+experiment=base", "trainer=ddp_cpu", "seed=0", *TINY],
        cwd=tmp_path,
        check=False,
        **ENV,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("kd_lightning: error: trainer.strategy=ddp")
    assert "re-run the whole sweep" in errors[0]
