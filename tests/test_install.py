"""The package installs the normal way: the wheel carries every preset and base config that
`attnbench run` needs, so a non-editable install works from any directory."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # keep build/ out of the source tree
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, cwd=build, capture_output=True)
    (path,) = out.glob("attnbench-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_preset_and_the_configs_they_name(wheel):
    from attnbench.run import PRESETS

    names = set(wheel.namelist())
    for preset in PRESETS:
        member = f"attnbench/configs/sweeps/{preset}.toml"
        assert member in names, f"preset {preset} missing from the wheel"
        tree = tomllib.loads(wheel.read(member).decode())
        base = Path(tree["base_config"]).with_suffix(".toml").name
        assert f"attnbench/configs/{base}" in names, f"{preset}'s base config {base} missing"
        # a mixer's own defaults, where it has a file, are read by the sweep (for each mixer of a hybrid's pattern)
        for mixer in {item.split("*")[0] for m in tree["mixers"] for item in m.split("+")}:
            own = ROOT / "attnbench" / "configs" / f"{mixer}.toml"
            if own.exists():
                assert f"attnbench/configs/{mixer}.toml" in names


def test_wheel_leaves_out_tests_and_results(wheel):
    names = wheel.namelist()
    assert not [n for n in names if n.startswith(("tests/", "results/", "scripts/"))]


def test_wheel_ships_the_saved_fla_files_of_the_presets_runs_only(wheel):
    """Autotuner choices and the preload's kernel lists are read at run time; the lists hold the
    presets' training and benchmark processes, never a test session's kernels."""
    names = wheel.namelist()
    assert "attnbench/fla_configs/NVIDIA_H200.json" in names
    for n in [n for n in names if n.endswith(".preload.json")]:
        keys = json.loads(wheel.read(n))["mixers"]
        assert keys and all(k.rsplit(":", 1)[1] in ("train", "bench") for k in keys), sorted(keys)
