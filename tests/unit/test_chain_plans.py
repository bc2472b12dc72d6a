"""Every chain experiment plans the same steps as before typed chain steps: names, dirs, seeds,
shared teachers, teacher steps and each step's composed config (the golden file was written by
the list-of-overrides implementation; deploy_cpu's entry was rewritten when it gained its
cross-family TA steps, and all were rewritten when scarce_cpu's teacher went to 12 epochs,
which also recorded methods_cpu's nst_gaussian after nst_poly_kd; regenerate only for an
intended change: `python -m tests.unit.test_chain_plans --write`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_lightning.chain import compose_step
from kd_lightning.chain_plan import plan_steps
from kd_lightning.conf_path import config_dir

GOLDEN = Path(__file__).with_name("chain_plans.json")
CONF = config_dir()
# The composed config keys a step's behaviour depends on (None where a config lacks the key).
KEYS = (
    "name",
    "seed",
    "role",
    "method",
    "variant",
    "model",
    "module._target_",
    "module.nst.kernel",
    "module.feature_pairs",
    "module.kd_weight",
    "module.methods",
    "module.teacher_model",
    "data.labeled_fraction",
    "data.image_size",
    "data.return_index",
    "trainer.max_epochs",
)


def chain_experiments() -> list[str]:
    names = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "experiment").glob("*.yaml")):
            cfg = compose(config_name="config", overrides=[f"+experiment={path.stem}"])
            if str(cfg.task).endswith("run_chain"):
                names.append(path.stem)
    return names


def snapshot(experiment: str) -> dict[str, Any]:
    """The experiment's plan over its own seeds and axes, and the composed config of every step
    of the first seed (other seeds differ only in `seed`)."""
    base = [f"+experiment={experiment}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        planned = plan_steps(compose(config_name="config", overrides=base))
        first_seed = planned[0]["seed"]
        steps = []
        for step in planned:
            entry = {k: step[k] for k in ("name", "dir", "seed", "shared", "teacher_step")}
            entry["variant"] = step["variant"]
            if step["seed"] == first_seed:
                teacher = "/x" if step["teacher_step"] is not None else None
                cfg = compose_step(step, teacher, base)
                entry["config"] = {
                    key: OmegaConf.to_container(value, resolve=True)
                    if OmegaConf.is_config(value := OmegaConf.select(cfg, key, default=None))
                    else value
                    for key in KEYS
                }
            steps.append(entry)
    return {"steps": steps}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def test_every_chain_experiment_is_in_the_golden_file(golden: dict[str, Any]) -> None:
    assert sorted(golden) == chain_experiments()


@pytest.mark.parametrize(
    "experiment", sorted(json.loads(GOLDEN.read_text())) if GOLDEN.is_file() else []
)
def test_chain_plan_is_unchanged(experiment: str, golden: dict[str, Any]) -> None:
    expected = golden[experiment]["steps"]
    actual = snapshot(experiment)["steps"]
    assert [s["dir"] for s in actual] == [s["dir"] for s in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got == want, want["dir"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(
        json.dumps({e: snapshot(e) for e in chain_experiments()}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {GOLDEN}")
