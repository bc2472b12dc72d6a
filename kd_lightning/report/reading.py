"""Reading a study's files: summary.json, chain.json, logs/metrics.csv, .hydra/overrides.yaml."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import (
    CHAIN_FILE,
    EPOCH_TEST_FILE,
    SUMMARY_FILE,
    ArtifactError,
    read_json,
    summary_path,
)

REPLICATE_KEYS = ("seed", "experiment", "name")
REQUIRED_KEYS = ("method", "role", "test")


class ReportError(ValueError):
    """A problem with the input directories that the user can fix; main prints it as one line."""


def collect_runs(dirs: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Every finished stage run (a directory with summary.json) below `dirs`, once each.

    Steps of a chain.json found below `dirs` whose directory lies elsewhere (a teacher trained
    in another place) are included too. Each run is a dict with keys: dir, summary_path, name,
    method, role, seed, arch, parameters, model_file_mb, epochs, seconds_per_epoch, test,
    best_val, overrides (list of Hydra override strings, [] outside a multirun), chain (chain
    name or None), curves ({"val/loss": {epoch: value}, ...}), epoch_test (per-epoch test
    metrics, see read_epoch_test; None without them) and summary (the raw dict).
    """
    roots = _existing_dirs(dirs)
    found: dict[Path, str | None] = {}
    for root in roots:
        for path in sorted(root.rglob(SUMMARY_FILE)):
            found.setdefault(path.resolve(), None)
    for chain in _read_chains(roots):
        for step_dir in chain["step_dirs"]:
            path = (step_dir / SUMMARY_FILE).resolve()
            if path.is_file():
                found[path] = chain["name"]
    return [_read_run(path, chain) for path, chain in sorted(found.items())]


def unfinished_chain_steps(dirs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """One line per chain step below `dirs` that is not done, for the report's notes."""
    lines = []
    for chain in _read_chains(_existing_dirs(dirs)):
        for step in chain["unfinished"]:
            lines.append(
                f"chain {chain['name']!r} ({chain['path']}): step {step.get('dir')} "
                f"({step.get('arch') or '?'}, {step.get('method') or '?'}, seed "
                f"{step.get('seed')}) is {step.get('status')}"
            )
    return lines


def _existing_dirs(dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    roots = []
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ReportError(
                f"{path} {what}; expected a run, chain or multirun directory (or a parent)"
            )
        roots.append(path)
    return roots


def _read_json(path: Path, expected: str) -> Any:
    try:
        return read_json(path, expected)
    except ArtifactError as err:
        raise ReportError(str(err)) from err


def _read_chains(roots: Sequence[Path]) -> list[dict[str, Any]]:
    chains = []
    seen: set[Path] = set()
    for root in roots:
        for path in sorted(root.rglob(CHAIN_FILE)):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            payload = _read_json(path, "a chain.json written by kd_lightning.chain")
            steps = payload.get("steps") if isinstance(payload, dict) else None
            if not isinstance(steps, list):
                raise ReportError(f"{path} has no 'steps' list; expected a kd_lightning chain.json")
            chain_dir = path.parent
            step_dirs, unfinished = [], []
            for step in steps:
                if not isinstance(step, dict):
                    continue
                if step.get("dir"):
                    # Relative dirs are relative to the chain directory, wherever it was copied.
                    step_dirs.append(chain_dir / str(step["dir"]))
                if step.get("status") != "done":
                    unfinished.append(step)
            name = str(payload.get("name") or chain_dir.name)
            chains.append(
                {"name": name, "path": path, "step_dirs": step_dirs, "unfinished": unfinished}
            )
    return chains


def _read_run(path: Path, chain: str | None) -> dict[str, Any]:
    summary = _read_json(path, "a summary.json written by kd_lightning.run")
    if not isinstance(summary, dict):
        raise ReportError(f"{path} holds a {type(summary).__name__}; expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing or not isinstance(summary.get("test"), dict):
        raise ReportError(
            f"{path} lacks {missing or ['a test dict']}; expected a kd_lightning stage summary "
            f"with keys {list(REQUIRED_KEYS)}"
        )
    run_dir = path.parent
    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    return {
        "dir": run_dir,
        "summary_path": path,
        "name": str(summary.get("name") or run_dir.name),
        "method": str(summary["method"]),
        "role": str(summary["role"]),
        "seed": summary.get("seed"),
        "arch": str(model.get("arch") or "?"),
        "parameters": summary.get("parameters"),
        "model_file_mb": summary.get("model_file_mb"),
        "epochs": summary.get("epochs"),
        "seconds_per_epoch": summary.get("seconds_per_epoch"),
        "test": _numbers(summary["test"]),
        "best_val": _numbers(summary.get("best_val") or {}),
        "overrides": read_overrides(run_dir),
        "chain": chain,
        "curves": read_curves(run_dir),
        "epoch_test": read_epoch_test(run_dir, summary),
        "summary": summary,
    }


def read_epoch_test(
    run_dir: Path, summary: dict[str, Any] | None = None
) -> dict[int, dict[str, float]] | None:
    """Test metrics after every epoch from EpochTestEvaluation (`+callbacks=epoch_test`):
    {epoch (0-based): {"auroc": ..., "acc": ...}}, from summary.json's "epoch_test" list, else
    `<run dir>/epoch_test.json` (a run still training); None when the run has neither.

    Rows without an integer epoch and a numeric auroc are left out; a later row for an epoch
    replaces an earlier one (an epoch redone after a resume).
    """
    rows = (summary or {}).get("epoch_test")
    path = run_dir / EPOCH_TEST_FILE
    if rows is None and path.is_file():
        rows = _read_json(path, "a list of per-epoch test metrics (EpochTestEvaluation)")
    if rows is None:
        return None
    if not isinstance(rows, list):
        where = path if (summary or {}).get("epoch_test") is None else summary_path(run_dir)
        raise ReportError(
            f"{where}: epoch_test holds a {type(rows).__name__}; expected a list of "
            "{epoch, auroc, acc} rows written by EpochTestEvaluation"
        )
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        epoch, values = row.get("epoch"), _numbers(row)
        if isinstance(epoch, int) and not isinstance(epoch, bool) and "auroc" in values:
            out[epoch] = {k: values[k] for k in ("auroc", "acc") if k in values}
    return out or None


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def read_overrides(run_dir: Path) -> list[str]:
    """The Hydra overrides behind a run: its own `.hydra/overrides.yaml` (a multirun job), else
    those of the chain job it is a step of (one or two levels below chain.json), else []."""
    for candidate in (run_dir, run_dir.parent, run_dir.parent.parent):
        path = candidate / ".hydra" / "overrides.yaml"
        if path.is_file() and (candidate == run_dir or (candidate / CHAIN_FILE).is_file()):
            return _parse_overrides(path)
    return []


def _parse_overrides(path: Path) -> list[str]:
    text = path.read_text()
    try:
        import yaml  # installed with hydra; the fallback covers copies read without it
    except ImportError:
        # Hydra writes a flat block list, one override per "- item" line.
        return [_unquote(line[1:].strip()) for line in text.splitlines() if line.startswith("-")]
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ReportError(
            f"{path} is not valid YAML ({err}); expected a list of overrides"
        ) from err
    if items is None:
        return []
    if not isinstance(items, list):
        raise ReportError(f"{path} holds a {type(items).__name__}; expected a list of overrides")
    return [str(item) for item in items]


def _unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        return item[1:-1]
    return item


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per-epoch validation metrics from Lightning's CSVLogger file: {"val/loss": {0: 0.61, ...}}.

    CSVLogger rows are sparse (train and validation rows share a header) and an epoch can appear
    in several rows, or again after a resume; the last value logged for an epoch wins.
    """
    path = _metrics_csv(run_dir)
    if path is None:
        return {}
    curves: dict[str, dict[int, float]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ReportError(f"{path} has no 'epoch' column; expected a Lightning CSVLogger file")
        columns = [c for c in reader.fieldnames if c.startswith("val/")]
        for row in reader:
            epoch = _float(row.get("epoch"))
            if epoch is None:
                continue
            for column in columns:
                value = _float(row.get(column))
                if value is not None:
                    curves.setdefault(column, {})[int(epoch)] = value
    return curves


def _metrics_csv(run_dir: Path) -> Path | None:
    primary = run_dir / "logs" / "metrics.csv"
    if primary.is_file():
        return primary
    # CSVLogger with a numbered version (logs/version_N/metrics.csv): the newest is the live one.
    others = sorted((run_dir / "logs").glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def _float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None
