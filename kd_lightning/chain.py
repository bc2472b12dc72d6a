"""A chain (or study) of stages: teacher -> TA ... -> student, over seeds, resumable.

The plan (typed steps in `chain.steps`, `chain.archs`, seeds and axes) is built by
kd_lightning/chain_plan.py; this module composes each planned step's config, runs it (or skips it
when finished, or resumes it from its `last.ckpt`), and keeps `chain.json`: every step's
architecture, teacher, best checkpoint, test metrics and status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kd_lightning.artifacts import (
    CHAIN_FILE,
    ArtifactError,
    has_predictions,
    read_summary,
    write_json_atomic,
)
from kd_lightning.chain_plan import _container, check_method, plan_steps
from kd_lightning.locks import directory_lock
from kd_lightning.run import run_dir, run_stage


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
    trained: list[float] = []  # wall seconds of each step trained by this process
    for index, (step, record) in enumerate(zip(planned, records, strict=True)):
        step_dir = chain_dir / step["dir"]
        teacher = _teacher_dir(planned, step, chain_dir)
        done = read_summary(step_dir) if record["status"] == "done" else None
        if done is not None:
            if not has_predictions(step_dir) or "statistics" not in done:
                # Finished before runs wrote predictions: run_stage adds them, trains nothing.
                run_stage(compose_step(step, teacher, base_overrides), out_dir=step_dir)
            continue
        step_cfg = compose_step(step, teacher, base_overrides)
        check_method(step["name"].split("[", 1)[0], str(step_cfg.method))
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
        left = sum(r["status"] != "done" for r in records[index:])
        print(
            progress_line(str(cfg.name), index + 1, len(planned), record, started, trained, left),
            flush=True,
        )
        step_started = time.perf_counter()
        try:
            summary = run_stage(step_cfg, out_dir=step_dir)
        except BaseException:
            record["status"] = "failed"
            try:
                write_json_atomic(state_path, _chain_payload(cfg, records))
            except OSError:
                pass  # a full disk: the step's own error is the one to show
            raise
        trained.append(time.perf_counter() - step_started)
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


def progress_line(
    study: str,
    number: int,
    total: int,
    record: dict[str, Any],
    started: float,
    trained: list[float],
    left: int,
    now: float | None = None,
) -> str:
    """`[kd_lightning] study NAME: step k/N DIR (ARCH, METHOD) — elapsed 12m03s, ~41m left`:
    the estimate is the mean wall time of the steps this process trained times the steps left
    to train (this one included); "estimating" until one has finished."""
    elapsed = (time.perf_counter() if now is None else now) - started
    estimate = f"~{_clock(sum(trained) / len(trained) * left)} left" if trained else "estimating"
    return (
        f"[kd_lightning] study {study}: step {number}/{total} {record['dir']} "
        f"({record['arch']}, {record['method']}) — elapsed {_clock(elapsed)}, {estimate}"
    )


def _clock(seconds: float) -> str:
    total = int(round(max(seconds, 0.0)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
        "seeds": _container(cfg.chain.get("seeds", [cfg.seed])),
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
