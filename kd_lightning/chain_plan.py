"""A study's plan: typed chain steps expanded over seeds and study axes (no training here;
kd_lightning/chain.py runs the plan).

`chain.steps` maps each step's name to a typed record (ChainStep):

    chain:
      steps:
        teacher: {shared: true, choices: {model: resnet50},
                  values: {role: teacher, method: supervised}}
        nst_linear: {teacher: teacher, choices: {model: resnet18, module: distill},
                     values: {method: nst_linear, module: {nst: {kernel: linear}}}}

- `teacher`: the step whose best checkpoint this step distils from (or a run dir / checkpoint);
- `shared`: run once for all seeds and axis values (a teacher);
- `choices`: config-group options ({group: option}; `+group` appends a group the defaults list
  lacks, as `+methods=fitnets` does on the command line);
- `values`: config values, nested ({module: {kd_weight: 16.0}}) or dotted; a dotted key's value
  is set whole (`module.teacher_model: {arch: resnet50}`).

Experiments merge: a later experiment changes single fields of a step, adds steps (at the end of
the mapping) or removes one (`nst_linear: null`); so can the command line
(`chain.steps.teacher.values.trainer.max_epochs=2`, `~chain.steps.nst_linear`). Steps run in
mapping order. `chain.archs` is a helper that expands into the same records (chain_steps).

Each step is the base config composed with the step's choices and values and then the user's
command-line overrides, so `trainer.max_epochs=1` shrinks every step. A step's `method` (the
label the report groups by) must be one of kd_lightning.artifacts.METHODS or the step's own name.
`chain.json` records every step's architecture, teacher, best checkpoint, test metrics and status;
running the same command again skips finished steps and resumes an interrupted one from its
`last.ckpt`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import METHODS
from kd_lightning.conf_path import config_dir

STEP_FIELDS = ("teacher", "shared", "choices", "values")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"true", "false", "null", "nan", "inf"}


@dataclass(frozen=True)
class ChainStep:
    """One step of a chain: what it changes in the base config and whom it learns from."""

    name: str
    teacher: str | None = None
    shared: bool = False
    choices: dict[str, Any] = field(default_factory=dict)  # group -> option ("+group": appended)
    values: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value

    @classmethod
    def parse(cls, name: str, raw: Any, where: str, fields: tuple[str, ...] = STEP_FIELDS):
        """The record for `raw` (a plain mapping); ValueError, one line naming `where`."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}={raw!r}: expected a mapping with fields {list(fields)}")
        unknown = [str(k) for k in raw if k not in fields]
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; expected {list(fields)}")
        teacher, shared = raw.get("teacher"), raw.get("shared", False)
        if teacher is not None and not isinstance(teacher, str):
            raise ValueError(f"{where}.teacher={teacher!r}: expected a step name or a path")
        if not isinstance(shared, bool):
            raise ValueError(f"{where}.shared={shared!r}: expected true or false")
        choices = raw.get("choices") or {}
        if not isinstance(choices, Mapping) or not all(
            isinstance(o, str) or (isinstance(o, list) and all(isinstance(i, str) for i in o))
            for o in choices.values()
        ):
            raise ValueError(f"{where}.choices={choices!r}: expected {{config group: option name}}")
        values = raw.get("values") or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}.values={values!r}: expected {{config key: value}}")
        return cls(
            name=name,
            teacher=teacher,
            shared=shared,
            choices={str(k): v for k, v in choices.items()},
            values=_flatten(values),
        )

    def overrides(self) -> list[str]:
        """The step as Hydra overrides: choices first, then values."""
        return [f"{group}={_render(option)}" for group, option in self.choices.items()] + [
            f"{key}={_render(value)}" for key, value in self.values.items()
        ]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value and "." not in str(key):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _render(value: Any) -> str:
    """A value in Hydra's override grammar (strings other than plain names quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_method(step: str, method: str) -> None:
    """A step's method label is a declared one (the report orders and pairs by them) or the
    step's own name (a new method named after its step)."""
    if method not in METHODS and method != step:
        raise ValueError(
            f"chain step {step!r}: method {method!r} is neither a known method "
            f"({', '.join(METHODS)}) nor the step's name; fix it or name the step after it"
        )


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def chain_steps(cfg: DictConfig) -> list[ChainStep]:
    """`chain.steps` in mapping order (null steps removed), followed by the steps `chain.archs`
    stands for.

    `chain.archs: [resnet152, resnet101, resnet50, resnet34, resnet18]` is a teacher-assistant
    chain: the first architecture is trained from scratch as step `<prefix><arch>` (or reused:
    `chain.teacher` names an existing step or path), each next one distils from the one before
    with `chain.hop`'s choices and values; the last is the student (`chain.student_name`).
    """
    for old in ("hop_overrides", "teacher_overrides"):
        if old in cfg.chain:
            raise ValueError(
                f"chain.{old} is no longer read; expected chain.hop: {{choices: {{group: option}}, "
                "values: {key: value}} (for the first architecture: a chain.steps entry and "
                "chain.teacher)"
            )
    raw = _container(cfg.chain.get("steps"))
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(
            f"chain.steps is a {type(raw).__name__}; expected a mapping "
            f"{{step name: {{{', '.join(STEP_FIELDS)}}}}} (see kd_lightning/chain.py)"
        )
    steps = [
        ChainStep.parse(str(name), body, f"chain.steps.{name}")
        for name, body in (raw or {}).items()
        if body is not None
    ]
    archs = [str(a) for a in cfg.chain.get("archs") or []]
    if not archs:
        if not steps:
            raise ValueError("chain has no steps; expected chain.steps or chain.archs")
        return steps
    if len(archs) < 2:
        raise ValueError(f"chain.archs={archs}: expected a teacher and at least one student")
    prefix = str(cfg.chain.get("prefix") or "")
    hop = ChainStep.parse(
        "hop", _container(cfg.chain.get("hop")) or {}, "chain.hop", ("choices", "values")
    )
    teacher = cfg.chain.get("teacher")
    if teacher is None:
        teacher = f"{prefix}{archs[0]}"
        choices, values = _network(archs[0])
        steps.append(
            ChainStep(
                name=teacher,
                shared=True,
                choices=choices,
                values={**values, "role": "teacher", "method": "supervised"},
            )
        )
    for index, arch in enumerate(archs[1:], start=1):
        last = index == len(archs) - 1
        name = (
            str(cfg.chain.get("student_name") or f"{prefix}{arch}") if last else f"{prefix}{arch}"
        )
        choices, values = _network(arch)
        steps.append(
            ChainStep(
                name=name,
                teacher=str(teacher),
                choices={**choices, **hop.choices},
                # The previous architecture is what this hop's teacher must be: a checkpoint of
                # another architecture is refused before training.
                values={
                    **values,
                    **hop.values,
                    "module.teacher_model": {"arch": archs[index - 1].removeprefix("timm/")},
                    "role": "student" if last else "ta",
                },
            )
        )
        teacher = name
    return steps


def _network(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """A `chain.archs` entry as (choices, values): a conf/model file by its name (resnet18, ...),
    `timm/NAME` any timm network, any other name a torchvision network, so one TA chain can cross
    families (densenet121 -> resnet34 -> mobilenet_v3_small)."""
    if (config_dir() / "model" / f"{arch}.yaml").is_file():
        return {"model": arch}, {}
    if arch.startswith("timm/"):
        return {"model": "timm"}, {"model.name": arch.removeprefix("timm/")}
    return {"model": "torchvision"}, {"model.name": arch}


def _axis_values(cfg: DictConfig) -> list[dict[str, tuple[str, Any]]]:
    """`chain.axes` ({axis name: {key: config key, values: [...]}}) as one {name: (key, value)}
    per combination, in order; [{}] without axes. Every non-shared step runs once per
    combination (e.g. `chain.axes.labeled_fraction.values=[0.03,1.0]` on the command line). An
    axis set to null is removed, as a step is (an experiment built on one with axes)."""
    raw = cfg.chain.get("axes")
    axes = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw or {}
    if not isinstance(axes, dict):
        raise ValueError(f"chain.axes={axes!r}: expected {{name: {{key: ..., values: [...]}}}}")
    combos: list[dict[str, tuple[str, Any]]] = [{}]
    for name, axis in axes.items():
        if axis is None:
            continue
        values = axis.get("values") if isinstance(axis, dict) else None
        if not isinstance(axis, dict) or not axis.get("key") or not isinstance(values, list):
            raise ValueError(
                f"chain.axes.{name}={axis!r}: expected {{key: <config key>, values: [...]}}"
            )
        if not values:
            raise ValueError(f"chain.axes.{name}.values is empty; expected at least one value")
        combos = [{**c, str(name): (str(axis["key"]), v)} for c in combos for v in values]
    return combos


def _axis_suffix(combo: dict[str, tuple[str, Any]]) -> str:
    return ",".join(f"{name}={value}" for name, (_, value) in combo.items())


def plan_steps(cfg: DictConfig) -> list[dict[str, Any]]:
    """Expand the chain's steps over `chain.seeds` and `chain.axes`; `shared: true` steps
    (teachers) run once. Each planned step: name, seed, shared, teacher_step, overrides (the
    step's choices and values, then its axis values), variant and dir."""
    seeds = [int(s) for s in cfg.chain.get("seeds", [cfg.seed])]
    steps = chain_steps(cfg)
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"chain steps have repeated names {names}; expected unique step names")
    shared_names = {s.name for s in steps if s.shared}
    for step in steps:
        if step.teacher is not None and step.teacher not in names:
            if not Path(step.teacher).exists():
                raise ValueError(
                    f"chain step {step.name!r}: teacher {step.teacher!r} is neither a step "
                    f"({names}) nor an existing path"
                )
        method = step.values.get("method", cfg.get("method"))
        if isinstance(method, str) and "${" not in method:
            check_method(step.name, method)
    combos = _axis_values(cfg)
    planned: list[dict[str, Any]] = []
    for seed in seeds:
        for combo in combos:
            suffix = _axis_suffix(combo)
            for step in steps:
                if step.shared and (seed != seeds[0] or combo != combos[0]):
                    continue
                variant = {} if step.shared else combo
                teacher = step.teacher
                if teacher is not None and teacher in names and teacher not in shared_names:
                    teacher = f"{teacher}[{suffix}]" if suffix else teacher
                label = f"{step.name}[{suffix}]" if suffix and not step.shared else step.name
                folder = step.name if not variant else f"{step.name}/{suffix.replace('=', '_')}"
                planned.append(
                    {
                        "name": label,
                        "seed": seeds[0] if step.shared else seed,
                        "shared": step.shared,
                        "teacher_step": teacher,
                        "overrides": step.overrides()
                        + [f"{key}={value}" for key, value in variant.values()],
                        "variant": {name: value for name, (_, value) in variant.items()},
                        "dir": folder if step.shared or len(seeds) == 1 else f"seed{seed}/{folder}",
                    }
                )
    return planned
