"""Typed chain steps: the mapping syntax, merging and command-line overrides of single steps,
one-line errors, method labels, `chain.archs` as records, and the study progress line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_lightning import chain
from kd_lightning.artifacts import METHODS, PAPER_METHODS
from kd_lightning.chain import compose_step
from kd_lightning.chain_plan import ChainStep, chain_steps, plan_steps
from kd_lightning.conf_path import config_dir


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _chain(steps: dict, **chain_keys) -> OmegaConf:
    return OmegaConf.create(
        {"seed": 0, "name": "t", "method": "supervised", "chain": {"steps": steps, **chain_keys}}
    )


def test_a_step_is_a_typed_record_rendered_as_overrides() -> None:
    step = ChainStep.parse(
        "dkd",
        {
            "teacher": "teacher",
            "choices": {"model": "resnet18", "module": "distill", "+methods": "dkd"},
            "values": {
                "method": "dkd",
                "module": {"feature_pairs": [], "methods": {"dkd": {"warmup": 1}}},
                "module.teacher_model": {"arch": "resnet50"},  # dotted: set whole
                "data": {"path": "${data_dir}/x.npz", "return_index": True},
            },
        },
        "chain.steps.dkd",
    )
    assert (step.name, step.teacher, step.shared) == ("dkd", "teacher", False)
    assert step.overrides() == [
        "model=resnet18",
        "module=distill",
        "+methods=dkd",
        "method=dkd",
        "module.feature_pairs=[]",
        "module.methods.dkd.warmup=1",
        "module.teacher_model={arch: resnet50}",
        "data.path='${data_dir}/x.npz'",
        "data.return_index=true",
    ]
    with pytest.raises(AttributeError):
        step.teacher = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ({"s": {"choice": {"model": "resnet18"}}}, r"chain.steps.s has unknown field\(s\)"),
        ({"s": "model=resnet18"}, r"chain.steps.s='model=resnet18': expected a mapping"),
        ({"s": {"shared": "yes"}}, r"chain.steps.s.shared='yes': expected true or false"),
        ({"s": {"teacher": 3}}, r"chain.steps.s.teacher=3: expected a step name"),
        ({"s": {"choices": {"model": 18}}}, r"chain.steps.s.choices=.*expected \{config group"),
        ({"s": {"values": ["method=base"]}}, r"chain.steps.s.values=.*expected \{config key"),
        ([{"name": "s", "overrides": []}], r"chain.steps is a list; expected a mapping"),
        ({"s": {"teacher": "nope"}}, r"chain step 's': teacher 'nope' is neither a step"),
        ({"s": {"values": {"method": "nst_poyl"}}}, r"chain step 's': method 'nst_poyl' is"),
    ],
)
def test_bad_steps_are_one_line_errors_naming_the_step(steps, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        plan_steps(_chain(steps))
    assert "\n" not in str(err.value)


def test_method_is_a_known_label_or_the_steps_own_name() -> None:
    assert set(PAPER_METHODS) <= set(METHODS) and "supervised" in METHODS
    plan_steps(_chain({"my_method": {"values": {"method": "my_method"}}}))  # its own name
    with pytest.raises(ValueError, match="chain step 'x': method 'my_method'"):
        plan_steps(_chain({"x": {"values": {"method": "my_method"}}}))
    with pytest.raises(ValueError, match="chain step 'base': method 'bse'"):
        chain.check_method("base", "bse")  # the composed config's method, checked before training


def test_experiments_merge_steps_and_the_command_line_overrides_one() -> None:
    cfg = _compose(["+experiment=paper_cpu", "chain.steps.teacher.values.trainer.max_epochs=1"])
    steps = {s.name: s for s in chain_steps(cfg)}
    # paper_cpu changes only paper's teacher: its model and epochs, the rest from paper.
    assert steps["teacher"] == ChainStep(
        name="teacher",
        shared=True,
        choices={"model": "resnet50"},
        values={"role": "teacher", "method": "supervised", "trainer.max_epochs": 1},
    )
    teacher = next(s for s in plan_steps(cfg) if s["name"] == "teacher")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        composed = compose_step(teacher, None, ["+experiment=paper_cpu"])
    assert (composed.model.arch, composed.trainer.max_epochs, composed.role) == (
        "resnet50",
        1,
        "teacher",
    )
    assert [s.name for s in chain_steps(cfg)] == [
        "teacher",
        "base",
        "nst_linear",
        "nst_poly",
        "ta_resnet34",
        "nst_poly_ta",
    ]


@pytest.mark.parametrize("removal", ["chain.steps.nst_linear=null", "~chain.steps.nst_linear"])
def test_a_step_set_to_null_or_deleted_is_removed(removal: str) -> None:
    planned = plan_steps(_compose(["+experiment=paper_cpu", "chain.seeds=[0]", removal]))
    assert [s["dir"] for s in planned] == [
        "teacher",
        "base",
        "nst_poly",
        "ta_resnet34",
        "nst_poly_ta",
    ]


def test_a_step_can_be_added_from_the_command_line() -> None:
    cfg = _compose(
        [
            "+experiment=quickstart",
            "+chain.steps.kd={teacher: teacher, choices: {module: distill}, values: {method: kd}}",
        ]
    )
    planned = plan_steps(cfg)
    assert [(s["dir"], s["teacher_step"]) for s in planned] == [
        ("teacher", None),
        ("base", None),
        ("kd", "teacher"),
    ]
    assert planned[-1]["overrides"] == ["module=distill", "method=kd"]


def test_archs_expand_into_the_same_records() -> None:
    cfg = _compose(["+experiment=nst_poly_ta", "chain.archs=[resnet50,resnet34,resnet18]"])
    assert chain_steps(cfg) == [
        ChainStep(
            name="resnet50",
            shared=True,
            choices={"model": "resnet50"},
            values={"role": "teacher", "method": "supervised"},
        ),
        ChainStep(
            name="resnet34",
            teacher="resnet50",
            choices={"model": "resnet34", "module": "distill"},
            values={
                "method": "nst_poly_ta",
                "module.teacher_model": {"arch": "resnet50"},
                "role": "ta",
            },
        ),
        ChainStep(
            name="resnet18",
            teacher="resnet34",
            choices={"model": "resnet18", "module": "distill"},
            values={
                "method": "nst_poly_ta",
                "module.teacher_model": {"arch": "resnet34"},
                "role": "student",
            },
        ),
    ]
    hop = _compose(["+experiment=nst_poly_ta", "+chain.hop.values.module.kd_weight=16.0"])
    assert chain_steps(hop)[1].values["module.kd_weight"] == 16.0


def test_archs_cross_network_families() -> None:
    cfg = _compose(
        [
            "+experiment=nst_poly_ta",
            "chain.archs=[densenet121,resnet34,timm/mobilenetv3_small_050]",
            "+chain.hop.values.module.feature_pairs=[]",
        ]
    )
    teacher, ta, student = chain_steps(cfg)
    assert (teacher.choices, teacher.values["model.name"]) == (
        {"model": "torchvision"},
        "densenet121",
    )
    assert ta.choices["model"] == "resnet34" and "model.name" not in ta.values
    assert ta.values["module.teacher_model"] == {"arch": "densenet121"}
    assert (student.choices["model"], student.values["model.name"]) == (
        "timm",
        "mobilenetv3_small_050",
    )
    assert student.values["module.teacher_model"] == {"arch": "resnet34"}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        composed = [
            compose_step(
                step,
                "/x" if step["teacher_step"] else None,
                [
                    "+experiment=nst_poly_ta",
                    "chain.archs=[densenet121,resnet34,timm/mobilenetv3_small_050]",
                ],
            )
            for step in plan_steps(cfg)
        ]
    assert [c.model.arch for c in composed] == ["densenet121", "resnet34", "mobilenetv3_small_050"]
    assert [c.model.get("family") for c in composed] == ["torchvision", None, "timm"]


def test_progress_line_estimates_from_the_steps_trained_here() -> None:
    record = {"dir": "seed0/kd/labeled_fraction_0.03", "arch": "resnet18", "method": "kd"}
    first = chain.progress_line("methods_cpu", 3, 67, record, 0.0, [], 65, now=723.0)
    assert first == (
        "[kd_lightning] study methods_cpu: step 3/67 seed0/kd/labeled_fraction_0.03 "
        "(resnet18, kd) — elapsed 12m03s, estimating"
    )
    later = chain.progress_line("s", 4, 5, record, 0.0, [600.0, 630.0], 2, now=7300.0)
    assert later.endswith("(resnet18, kd) — elapsed 2h01m, ~20m30s left")


def test_run_chain_prints_progress_before_each_trained_step(tmp_path, monkeypatch, capsys):
    cfg = _chain(
        {
            "teacher": {"shared": True, "values": {"method": "supervised"}},
            "base": {"values": {"method": "base"}},
            "kd": {"teacher": "teacher", "values": {"method": "kd"}},
        },
        report=False,
    )
    planned = plan_steps(cfg)
    (tmp_path / "teacher").mkdir()
    clock = iter(float(t) for t in range(0, 10_000, 60))  # each reading one minute later
    monkeypatch.setattr(chain, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(chain, "user_overrides", lambda: [])
    monkeypatch.setattr(
        chain,
        "compose_step",
        lambda step, teacher, base: OmegaConf.create(
            {"model": {"arch": "resnet18"}, "method": step["name"], "role": "student"}
        ),
    )
    monkeypatch.setattr(
        chain, "run_stage", lambda cfg, out_dir: {"best_checkpoint": "b.ckpt", "test": {}}
    )
    done = {"teacher": {"model": {"arch": "resnet50"}, "method": "supervised", "role": "teacher"}}
    done["teacher"].update(best_checkpoint="t.ckpt", test={}, statistics={})
    monkeypatch.setattr(chain, "read_summary", lambda d: done.get(d.name))
    monkeypatch.setattr(chain, "has_predictions", lambda d: True)
    chain._run_chain(cfg, tmp_path, planned)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[kd_lightning]")]
    assert lines == [
        "[kd_lightning] study t: step 2/3 base (resnet18, base) — elapsed 1m00s, estimating",
        "[kd_lightning] study t: step 3/3 kd (resnet18, kd) — elapsed 4m00s, ~1m00s left",
    ]


def test_the_old_list_keys_of_a_hop_are_refused_in_one_line() -> None:
    cfg = _chain({}, archs=["resnet50", "resnet18"], hop_overrides=["module=distill"])
    with pytest.raises(ValueError, match=r"chain.hop_overrides is no longer read; expected chain"):
        chain_steps(cfg)
