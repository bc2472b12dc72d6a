"""Every config composes and runs one batch: experiments, chain steps, config choices."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.chain_plan import plan_steps
from kd_lightning.conf_path import config_dir
from kd_lightning.run import run_stage

CONF = config_dir()
# One batch everywhere, small images: the full-scale 224 px configs run here at 32 px.
ONE_BATCH = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=4",
    "data.image_size=32",
    "data.path=${data_dir}/pneumoniamnist.npz",
    "logger=csv",
    "callbacks.model_checkpoint.save_last=false",  # a one-batch run is never resumed; saves a copy
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _task(experiment: str) -> str:
    return str(_compose([f"+experiment={experiment}"]).task)


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CHAIN_EXPERIMENTS = [e for e in EXPERIMENTS if _task(e).endswith("run_chain")]
STAGE_EXPERIMENTS = [e for e in EXPERIMENTS if e not in CHAIN_EXPERIMENTS]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, shared_npz: Path) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_stage(_compose(["+experiment=base", *ONE_BATCH]), out_dir=out)
    return out


def _needs_teacher(cfg) -> bool:
    return "teacher" in cfg.module.keys()  # `in` on a DictConfig skips ??? values


@pytest.mark.parametrize("experiment", STAGE_EXPERIMENTS)
def test_stage_experiment_runs_one_batch(experiment: str, teacher_dir: Path, tmp_path) -> None:
    overrides = [f"+experiment={experiment}", *ONE_BATCH]
    if _needs_teacher(_compose(overrides)):
        overrides.append(f"module.teacher={teacher_dir}")
    summary = run_stage(_compose(overrides), out_dir=tmp_path)
    assert (tmp_path / "summary.json").is_file()
    assert 0.0 <= summary["test"]["test/acc"] <= 1.0


def test_stage_and_chain_experiments_are_all_covered() -> None:
    assert {"teacher", "base", "nst_linear", "nst_poly", "nst_gaussian", "kd"} <= set(
        STAGE_EXPERIMENTS
    )
    assert {
        "quickstart",
        "paper",
        "paper_cpu",
        "methods_cpu",
        "nst_poly_ta",
        "ta_size",
        "ta_size_cpu",
    } <= set(CHAIN_EXPERIMENTS)


def test_methods_cpu_compares_methods_on_equal_terms() -> None:
    steps = plan_steps(_compose(["+experiment=methods_cpu"]))
    students: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        if step["name"] == "teacher":
            continue
        teacher = ["module.teacher=/x"] if step["teacher_step"] else []
        cfg = _compose(["+experiment=methods_cpu", *step["overrides"], *teacher])
        name = step["name"].split("[", 1)[0]
        students.setdefault(name, []).append((step["seed"], cfg.data.labeled_fraction))
        assert cfg.model.arch == "resnet18" and cfg.data.image_size == 32, name
        assert cfg.trainer.max_epochs == 6 and cfg.data.class_weighting, name
        assert cfg.optimizer._target_.endswith("Adam"), name
        assert "epoch_test" in cfg.callbacks, name
        if step["teacher_step"]:
            nst_weights = [p["weight"] for p in cfg.module.feature_pairs]
            expected = {
                "nst_linear": ("linear", [50.0], 0.0, []),
                "nst_poly": ("poly", [50.0], 0.0, []),
                "nst_gaussian": ("gaussian", [50.0], 0.0, []),
                "kd": ("poly", [], 16.0, []),
                "nst_poly_kd": ("poly", [50.0], 16.0, []),
                "fitnets": ("poly", [], 0.0, ["fitnets"]),
                "at": ("poly", [], 0.0, ["at"]),
                "dkd": ("poly", [], 0.0, ["dkd"]),
                "rkd": ("poly", [], 0.0, ["rkd"]),
                "crd": ("poly", [], 0.0, ["crd"]),
            }[name]
            methods = list((cfg.module.get("methods") or {}).keys())
            assert (cfg.module.nst.kernel, nst_weights, cfg.module.kd_weight, methods) == expected
            assert cfg.method == name and step["teacher_step"] == "teacher"
            assert cfg.data.return_index == (name == "crd"), name
    assert students == {
        name: [(s, f) for s in (0, 1, 2) for f in (0.03, 1.0)]
        for name in (
            "base",
            "nst_linear",
            "nst_poly",
            "nst_gaussian",
            "kd",
            "nst_poly_kd",
            "fitnets",
            "at",
            "dkd",
            "rkd",
            "crd",
        )
    }


def _chain_step_configs() -> list[tuple[str, list[str], bool]]:
    steps = []
    for experiment in CHAIN_EXPERIMENTS:
        for step in plan_steps(_compose([f"+experiment={experiment}", "chain.seeds=[0]"])):
            overrides = [f"+experiment={experiment}", *step["overrides"]]
            steps.append(
                (f"{experiment}/{step['name']}", overrides, step["teacher_step"] is not None)
            )
    return steps


CHAIN_STEPS = _chain_step_configs()


def test_every_chain_step_composes() -> None:
    for label, overrides, has_teacher in CHAIN_STEPS:
        cfg = _compose([*overrides, *(["module.teacher=/x"] if has_teacher else [])])
        assert cfg.model.arch.startswith(("resnet", "densenet", "mobilenet")), label
        assert cfg.module._target_.endswith(("ClassifierModule", "DistillModule")), label
        assert has_teacher == cfg.module._target_.endswith("DistillModule"), label


def test_one_override_switches_the_teacher_cache_for_every_step_of_a_study() -> None:
    """`teacher_cache.enabled=false` on a study's command line composes for its teacher and Base
    steps (which have no teacher) and reaches every distillation step's module."""
    seen = set()
    for label, overrides, has_teacher in CHAIN_STEPS:
        extra = ["module.teacher=/x"] if has_teacher else []
        cfg = _compose(
            [*overrides, *extra, "teacher_cache.enabled=false", "teacher_cache.max_gb=0.5"]
        )
        if has_teacher:
            cache = OmegaConf.to_container(cfg.module.teacher_cache, resolve=True)
            assert cache == {"enabled": False, "dir": None, "max_gb": 0.5}, label
        seen.add(has_teacher)
    assert seen == {True, False}
    default = _compose(["+experiment=kd", "module.teacher=/x"]).module.teacher_cache
    assert default.enabled is True and default.max_gb == 4.0


@functools.cache
def _distinct_step_kinds() -> dict[tuple[str, str], tuple[str, list[str], bool]]:
    kinds = {}
    for label, overrides, has_teacher in CHAIN_STEPS:
        cfg = _compose([*overrides, *(["module.teacher=/x"] if has_teacher else [])])
        kinds.setdefault(
            (str(cfg.model.arch), str(cfg.module._target_)), (label, overrides, has_teacher)
        )
    return kinds


def _chain_teacher(experiment: str, out: Path) -> Path:
    """The experiment's own shared teacher step, trained for one batch."""
    steps = plan_steps(_compose([f"+experiment={experiment}", "chain.seeds=[0]"]))
    shared = next(s for s in steps if s["shared"])
    run_stage(
        _compose([f"+experiment={experiment}", *shared["overrides"], *ONE_BATCH]), out_dir=out
    )
    return out


@pytest.mark.parametrize(
    "kind", sorted(_distinct_step_kinds()), ids=lambda k: f"{k[0]}-{k[1].split('.')[-1]}"
)
def test_each_kind_of_chain_step_runs_one_batch(kind, teacher_dir: Path, tmp_path: Path) -> None:
    label, overrides, has_teacher = _distinct_step_kinds()[kind]
    overrides = [*overrides, *ONE_BATCH]
    if has_teacher:
        # One small teacher for every step: drop the hop's expected teacher architecture. A step
        # that hooks non-ResNet teacher layers (deploy_cpu's DenseNet) gets its chain's teacher.
        cfg = _compose([*overrides, "module.teacher=/x"])
        layers = [p["teacher"] for p in cfg.module.get("feature_pairs") or []]
        teacher = teacher_dir
        if any(not layer.startswith("layer") for layer in layers):
            teacher = _chain_teacher(label.split("/")[0], tmp_path / "teacher")
        overrides += [f"module.teacher={teacher}", "module.teacher_model=null"]
    summary = run_stage(_compose(overrides), out_dir=tmp_path)
    assert summary["model"]["arch"] == kind[0], label


@pytest.mark.parametrize(
    "choice",
    [
        "optimizer=sgd",
        "scheduler=none",
        "logger=tensorboard",
        "model=resnet34",
        "model.stem=small",
        "model.in_channels=3",
        "trainer.precision=bf16-mixed",
        "module.channels_last=true",
    ],
)
def test_config_choices_run_one_batch(choice: str, tmp_path: Path, shared_npz: Path) -> None:
    cfg = _compose(["+experiment=base", *ONE_BATCH, choice])
    summary = run_stage(cfg, out_dir=tmp_path)
    assert summary["test"]["test/auroc"] >= 0.0


def test_full_scale_gpu_config_composes() -> None:
    cfg = _compose(["+experiment=paper", "trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.image_size == 224
    assert OmegaConf.select(cfg, "chain.archs")[0] == "resnet152"


def test_nst_options_reach_the_loss() -> None:
    cfg = _compose(
        ["+experiment=nst_gaussian", "module.teacher=/x", "module.nst.teacher_term=false"]
    )
    loss = instantiate(cfg.module.nst)
    assert (loss.kernel, loss.teacher_term, loss.sigma2) == ("gaussian", False, None)
    bad = _compose(["+experiment=nst_poly", "module.teacher=/x", "module.nst.teacher_term=maybe"])
    with pytest.raises(InstantiationException, match="teacher_term must be true or false"):
        instantiate(bad.module.nst)


def test_scarce_cpu_runs_every_method_at_every_label_fraction() -> None:
    steps = plan_steps(_compose(["+experiment=scarce_cpu"]))
    teacher = [s for s in steps if s["shared"]]
    assert [s["name"] for s in teacher] == ["teacher"] and teacher[0]["variant"] == {}
    students = [s for s in steps if not s["shared"]]
    fractions = [0.01, 0.03, 0.1, 0.3, 1.0]
    assert len(students) == 4 * len(fractions) * 3 and len({s["dir"] for s in steps}) == 61
    for step in students:
        fraction = step["variant"]["labeled_fraction"]
        assert f"data.labeled_fraction={fraction}" in step["overrides"]
        assert step["dir"] == f"seed{step['seed']}/{step['name'].split('[')[0]}/" + (
            f"labeled_fraction_{fraction}"
        )
        teacher_arg = ["module.teacher=/x"] if step["teacher_step"] else []
        cfg = _compose(["+experiment=scarce_cpu", *step["overrides"], *teacher_arg])
        assert cfg.data.labeled_fraction == fraction and cfg.trainer.max_epochs == 6
        assert step["teacher_step"] in (None, "teacher")  # the shared, fully labelled teacher
    cfg = _compose(["+experiment=scarce_cpu", *teacher[0]["overrides"]])
    assert cfg.data.labeled_fraction == 1.0 and cfg.model.arch == "resnet34"
    assert cfg.trainer.max_epochs == 12  # teacher_recipes_cpu's best recipe
    combos = {(s["name"].split("[")[0], s["variant"]["labeled_fraction"]) for s in students}
    assert combos == {(m, f) for m in ("base", "nst_poly", "kd", "nst_poly_kd") for f in fractions}


def test_chain_axes_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"chain.axes.labeled_fraction=.*expected \{key"):
        plan_steps(_compose(["+experiment=scarce_cpu", "chain.axes.labeled_fraction=0.1"]))
    with pytest.raises(ValueError, match="chain.axes.labeled_fraction.values is empty"):
        plan_steps(_compose(["+experiment=scarce_cpu", "chain.axes.labeled_fraction.values=[]"]))


def test_a_null_axis_is_removed() -> None:
    steps = plan_steps(_compose(["+experiment=scarce_cpu", "chain.axes.labeled_fraction=null"]))
    assert [s["name"] for s in steps if s["seed"] == 1] == ["base", "nst_poly", "kd", "nst_poly_kd"]
    assert all(not s.get("variant") for s in steps)
