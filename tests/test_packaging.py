"""Packaging as a user meets it.

* ``pip install .``: build a wheel of this checkout, install it into a temporary folder, and from outside the
  checkout import every bench/ and conversion/ module under its installed name (``kimi_linear_bench.*``,
  ``kimi_linear_conversion.*``) and run ``kimi-linear bench ... -- --help`` (the console script and
  ``modeling_kimi_linear.cli``). The demo checkpoint's data files are left out of the wheel built here (34 MB to
  zip; nothing here reads them).
* The FLA requirement: setup.cfg's ``gpu`` extra, the install hint in error messages and the README agree."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what setup.cfg packages (the wheel is built from a copy of these, so the checkout gets no build/ or egg-info)
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "modeling_kimi_linear", "bench", "conversion", "configuration")

#: imports every module of the two script packages, then runs ``kimi-linear <argv>`` for each help command and the
#: installed console script in this one process (a process per command would start torch and transformers each time)
IMPORT_AND_HELP = """
import contextlib, importlib, io, json, pkgutil, sys
import kimi_linear_bench, kimi_linear_conversion, modeling_kimi_linear
from modeling_kimi_linear.cli import main
names = [info.name for package in (kimi_linear_bench, kimi_linear_conversion)
         for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]
files = {name: importlib.import_module(name).__file__ for name in names}
files["modeling_kimi_linear"] = modeling_kimi_linear.__file__
helps = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    helps[" ".join(argv)] = [code, out.getvalue()]
import runpy  # the console script pip wrote, run as its own process would run it
sys.argv = [sys.argv[2], "bench", "gpu_check", "--", "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
helps["console script"] = [code, out.getvalue()]
print(json.dumps({"files": files, "helps": helps}))
"""

#: ``kimi-linear`` arguments and an option that only the delegated script's own help lists
HELP_COMMANDS = {
    ("bench", "cpu", "--", "--help"): "--decode-steps",
    ("bench", "gpu", "--", "--help"): "--lengths",
    ("bench", "gpu_check", "--", "--help"): "--only",
    ("convert", "--help"): "--max-shard-size",
    ("export", "--help"): "--max-shard-size",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the installed wheel (the package and its console script under bin/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheels = list((tmp / "dist").glob("kimi_linear-*.whl"))
    assert len(wheels) == 1, wheels
    target = tmp / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheels[0])],
                   check=True, capture_output=True, timeout=600)
    return target


def run_outside(installed: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``args`` from a folder outside the checkout with the installed wheel first on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_every_script_module_imports_and_bench_runs_from_the_wheel(installed, tmp_path):
    script = installed / "bin" / "kimi-linear"
    assert script.is_file(), f"no console script in {installed / 'bin'}"
    commands = [list(argv) for argv in HELP_COMMANDS]
    result = run_outside(installed, [sys.executable, "-c", IMPORT_AND_HELP, json.dumps(commands), str(script)],
                         tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    files = report["files"]
    bench = {name.rsplit(".", 1)[1] for name in files if name.startswith("kimi_linear_bench.")}
    conversion = {name.rsplit(".", 1)[1] for name in files if name.startswith("kimi_linear_conversion.")}
    assert bench == {p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"}
    assert conversion == {p.stem for p in (ROOT / "conversion").glob("*.py") if p.stem != "__init__"}
    outside = {name: path for name, path in files.items() if not Path(path).resolve().is_relative_to(installed)}
    assert not outside, f"imported from outside the installed wheel: {outside}"
    expected = {" ".join(argv): option for argv, option in HELP_COMMANDS.items()}
    expected["console script"] = "--only"  # kimi-linear bench gpu_check -- --help
    for command, option in expected.items():
        code, out = report["helps"][command]
        assert code == 0 and "usage:" in out and option in out, (command, code, out[-1000:])


def setup_cfg_extras() -> dict[str, list[str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return {name: [line.strip() for line in value.splitlines() if line.strip()]
            for name, value in parser["options.extras_require"].items()}


def test_fla_requirement_agrees_in_setup_cfg_hint_and_readme():
    from packaging.requirements import Requirement

    from modeling_kimi_linear.kda_fla import FLA_INSTALL_HINT, FLA_REQUIREMENT

    extras = setup_cfg_extras()
    assert extras["gpu"] == [FLA_REQUIREMENT]
    assert f"pip install '{FLA_REQUIREMENT}' triton" in FLA_INSTALL_HINT
    assert "flash-linear-attention" in FLA_INSTALL_HINT
    readme = (ROOT / "README.md").read_text()
    assert f"pip install '{FLA_REQUIREMENT}' triton" in readme and 'pip install "kimi-linear[gpu]"' in readme
    # the version the tests pin lies in the range users get
    wanted = Requirement(FLA_REQUIREMENT)
    pinned = [Requirement(r) for r in extras["test"] if Requirement(r).name == wanted.name]
    assert len(pinned) == 1 and all(v in wanted.specifier for v in (s.version for s in pinned[0].specifier))
