"""A chain (or study) of stages: teacher -> TA ... -> student, over seeds, resumable.

Each step is the base config composed with the step's own overrides (config-group choices and
values, as on the command line) and then the user's command-line overrides, so
`trainer.max_epochs=1` shrinks every step. A step with `teacher: <step name>` distils from that
step's best checkpoint.
`chain.json` records every step's architecture, teacher, best checkpoint, test metrics and status;
running the same command again skips finished steps and resumes an interrupted one from its
`last.ckpt`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import (
    CHAIN_FILE,
    ArtifactError,
    has_predictions,
    read_summary,
    write_json_atomic,
)
from kd_lightning.locks import directory_lock
from kd_lightning.run import run_dir, run_stage


def chain_steps(cfg: DictConfig) -> list[dict[str, Any]]:
    """`chain.steps` as written, followed by the steps `chain.archs` stands for.

    `chain.archs: [resnet152, resnet101, resnet50, resnet34, resnet18]` is a teacher-assistant
    chain: the first architecture is trained from scratch (or reused: `chain.teacher` names an
    existing step or path), each next one distils from the one before with `chain.hop_overrides`;
    the last is the student.
    """
    steps = [OmegaConf.to_container(step, resolve=False) for step in cfg.chain.get("steps") or []]
    archs = [str(a) for a in cfg.chain.get("archs") or []]
    if not archs:
        if not steps:
            raise ValueError("chain has no steps; expected chain.steps or chain.archs")
        return steps
    if len(archs) < 2:
        raise ValueError(f"chain.archs={archs}: expected a teacher and at least one student")
    prefix = str(cfg.chain.get("prefix") or "")
    hop = [str(o) for o in cfg.chain.get("hop_overrides") or []]
    teacher = cfg.chain.get("teacher")
    if teacher is None:
        teacher = f"{prefix}{archs[0]}"
        steps.append(
            {
                "name": teacher,
                "shared": True,
                "overrides": [f"model={archs[0]}", "role=teacher", "method=supervised"]
                + [str(o) for o in cfg.chain.get("teacher_overrides") or []],
            }
        )
    for index, arch in enumerate(archs[1:], start=1):
        last = index == len(archs) - 1
        # The previous architecture is what this hop's teacher must be: a checkpoint of another
        # architecture is refused before training.
        expect = f"module.teacher_model={{arch: {archs[index - 1]}}}"
        name = (
            str(cfg.chain.get("student_name") or f"{prefix}{arch}") if last else f"{prefix}{arch}"
        )
        steps.append(
            {
                "name": name,
                "teacher": str(teacher),
                "overrides": [f"model={arch}", *hop, expect, f"role={'student' if last else 'ta'}"],
            }
        )
        teacher = name
    return steps


def _axis_values(cfg: DictConfig) -> list[dict[str, tuple[str, Any]]]:
    """`chain.axes` ({axis name: {key: config key, values: [...]}}) as one {name: (key, value)}
    per combination, in order; [{}] without axes. Every non-shared step runs once per
    combination (e.g. `chain.axes.labeled_fraction.values=[0.03,1.0]` on the command line)."""
    raw = cfg.chain.get("axes")
    axes = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw or {}
    if not isinstance(axes, dict):
        raise ValueError(f"chain.axes={axes!r}: expected {{name: {{key: ..., values: [...]}}}}")
    combos: list[dict[str, tuple[str, Any]]] = [{}]
    for name, axis in axes.items():
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
    (teachers) run once."""
    seeds = [int(s) for s in cfg.chain.get("seeds", [cfg.seed])]
    steps = chain_steps(cfg)
    names = [str(step["name"]) for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"chain steps have repeated names {names}; expected unique step names")
    shared_names = {str(s["name"]) for s in steps if s.get("shared", False)}
    planned: list[dict[str, Any]] = []
    for seed in seeds:
        for combo in _axis_values(cfg):
            suffix = _axis_suffix(combo)
            for step in steps:
                shared = bool(step.get("shared", False))
                if shared and (seed != seeds[0] or combo != _axis_values(cfg)[0]):
                    continue
                teacher = step.get("teacher")
                if teacher is not None and str(teacher) not in names:
                    if not Path(str(teacher)).exists():
                        raise ValueError(
                            f"chain step {step['name']!r}: teacher {teacher!r} is neither a step "
                            f"({names}) nor an existing path"
                        )
                variant = {} if shared else combo
                name = str(step["name"])
                if teacher is not None and str(teacher) in names and teacher not in shared_names:
                    teacher = f"{teacher}[{suffix}]" if suffix else str(teacher)
                label = f"{name}[{suffix}]" if suffix and not shared else name
                folder = name if not variant else f"{name}/{suffix.replace('=', '_')}"
                planned.append(
                    {
                        "name": label,
                        "seed": seeds[0] if shared else seed,
                        "shared": shared,
                        "teacher_step": str(teacher) if teacher is not None else None,
                        "overrides": [str(o) for o in step.get("overrides", [])]
                        + [f"{key}={value}" for key, value in variant.values()],
                        "variant": {name: value for name, (_, value) in variant.items()},
                        "dir": folder if shared or len(seeds) == 1 else f"seed{seed}/{folder}",
                    }
                )
    return planned


def _teacher_dir(
    planned: list[dict[str, Any]], step: dict[str, Any], chain_dir: Path
) -> str | None:
    ref = step["teacher_step"]
    if ref is None:
        return None
    for other in planned:
        if other["name"] == ref and (other["shared"] or other["seed"] == step["seed"]):
            return str(chain_dir / other["dir"])
    return str(Path(ref).resolve())


def user_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def compose_step(
    step: dict[str, Any], teacher: str | None, base_overrides: list[str]
) -> DictConfig:
    overrides = [
        *step["overrides"],
        *base_overrides,
        f"seed={step['seed']}",
        f"name={step['name'].split('[', 1)[0]}",
    ]
    # The config's `variant: {}` is a struct: each axis value is added with ++.
    overrides += [f"++variant.{key}={value}" for key, value in (step.get("variant") or {}).items()]
    if teacher is not None:
        # Quoted: run directories may hold '=' or ',' (Hydra sweep subdirs do).
        overrides.append(f"module.teacher='{teacher}'")
    return compose(config_name="config", overrides=overrides)


def run_chain(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume, or only report) every planned step. One process at a time per study
    directory; each step's run_stage also holds its own step directory."""
    chain_dir = run_dir()
    planned = plan_steps(cfg)
    with directory_lock(chain_dir, "study directory"):
        return _run_chain(cfg, chain_dir, planned)


def _run_chain(cfg: DictConfig, chain_dir: Path, planned: list[dict[str, Any]]) -> dict[str, Any]:
    state_path = chain_dir / CHAIN_FILE
    records = _initial_records(planned, chain_dir, state_path)
    base_overrides = user_overrides()
    started = time.perf_counter()
    for step, record in zip(planned, records, strict=True):
        step_dir = chain_dir / step["dir"]
        teacher = _teacher_dir(planned, step, chain_dir)
        done = read_summary(step_dir) if record["status"] == "done" else None
        if done is not None:
            if not has_predictions(step_dir) or "statistics" not in done:
                # Finished before runs wrote predictions: run_stage adds them, trains nothing.
                run_stage(compose_step(step, teacher, base_overrides), out_dir=step_dir)
            continue
        step_cfg = compose_step(step, teacher, base_overrides)
        record.update(
            {
                "arch": str(step_cfg.model.arch),
                "method": str(step_cfg.method),
                "role": str(step_cfg.role),
                "teacher": teacher,
                "status": "running",
            }
        )
        write_json_atomic(state_path, _chain_payload(cfg, records))
        print(f"[kd_lightning] chain step {step['dir']} ({record['arch']}, {record['method']})")
        try:
            summary = run_stage(step_cfg, out_dir=step_dir)
        except BaseException:
            record["status"] = "failed"
            try:
                write_json_atomic(state_path, _chain_payload(cfg, records))
            except OSError:
                pass  # a full disk: the step's own error is the one to show
            raise
        record.update(
            {
                "status": "done",
                "best_checkpoint": summary["best_checkpoint"],
                "test": summary["test"],
            }
        )
        write_json_atomic(state_path, _chain_payload(cfg, records))
    payload = _chain_payload(cfg, records)
    payload["seconds_this_run"] = round(time.perf_counter() - started, 1)
    write_json_atomic(state_path, payload)
    _report(cfg, chain_dir)
    _print_table(records)
    return payload


def _initial_records(
    planned: list[dict[str, Any]], chain_dir: Path, state_path: Path
) -> list[dict[str, Any]]:
    previous: dict[str, dict[str, Any]] = {}
    if state_path.is_file():
        try:
            previous = {s["dir"]: s for s in json.loads(state_path.read_text())["steps"]}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ArtifactError(
                f"{state_path} is not a readable chain file ({type(err).__name__}: {err}); "
                "move it away and rerun: finished steps are found again from their summary.json"
            ) from err
    records = []
    for step in planned:
        record = {
            "name": step["name"],
            "seed": step["seed"],
            "dir": step["dir"],
            "arch": None,
            "method": None,
            "role": None,
            "teacher": None,
            "best_checkpoint": None,
            "test": None,
            "status": "pending",
        }
        record.update(previous.get(step["dir"], {}))
        summary = read_summary(chain_dir / step["dir"])
        if summary is not None:
            record.update(
                status="done",
                arch=summary["model"]["arch"],
                method=summary["method"],
                role=summary["role"],
                best_checkpoint=summary["best_checkpoint"],
                test=summary["test"],
            )
        elif record["status"] == "done":
            record["status"] = "pending"
        records.append(record)
    return records


def _chain_payload(cfg: DictConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": str(cfg.name),
        "seeds": OmegaConf.to_container(cfg.chain.get("seeds", [cfg.seed])),
        "steps": records,
    }


def _report(cfg: DictConfig, chain_dir: Path) -> None:
    if not cfg.chain.get("report", False):
        return
    from kd_lightning import report

    evaluation = dict(cfg.get("evaluation") or {})
    report.write_report(
        report.collect_runs([chain_dir]),
        chain_dir,
        notes=report.unfinished_chain_steps([chain_dir]),
        evaluation=evaluation,
    )


def _print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'step':<24}{'arch':<11}{'method':<19}{'status':<9}{'test/acc':>9}{'test/auroc':>11}")
    for r in records:
        test = r.get("test") or {}
        acc = "-" if test.get("test/acc") is None else f"{test['test/acc']:.4f}"
        auroc = "-" if test.get("test/auroc") is None else f"{test['test/auroc']:.4f}"
        print(
            f"{r['dir']:<24}{r['arch'] or '-':<11}{r['method'] or '-':<19}{r['status']:<9}"
            f"{acc:>9}{auroc:>11}"
        )
