"""`pip install .` ships the Hydra configs: an installed copy runs from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.cli import ROOT, cli_env


def test_installed_wheel_finds_its_configs(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("kd_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("kd_lightning/conf/") and n.endswith(".yaml")}
    in_checkout = {
        "kd_lightning/conf/" + str(p.relative_to(ROOT / "conf"))
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert shipped == in_checkout

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "kd_lightning", "+experiment=paper", "--cfg", "job"],
        cwd=elsewhere,
        env=cli_env(PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "pneumoniamnist_224.npz" in proc.stdout and "resnet152" in proc.stdout
    assert (
        str(target)
        in subprocess.run(
            [sys.executable, "-c", "import kd_lightning.conf_path as c; print(c.config_dir())"],
            cwd=elsewhere,
            env=cli_env(PYTHONPATH=str(target)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
