"""The package as pyproject.toml describes it: console scripts, package list, version, requirements.txt, and an
installed (non-editable) wheel that finds its configs.

The wheel is built with setuptools' own build backend from a copy of the files it needs (no network, nothing
written into the checkout) and read unpacked, as ``pip install .`` would lay it out in site-packages.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train", "infer", "evaluate", "export")


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_console_scripts_resolve_to_callables(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert sorted(scripts) == sorted(f"frcnn-{tool}" for tool in TOOLS)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        function = getattr(importlib.import_module(module_name), attr)
        assert callable(function), name
        assert module_name == f"frcnn.cli.{name[len('frcnn-'):]}", name


def test_every_package_is_listed(pyproject):
    """A new subpackage of frcnn/ missing from ``[tool.setuptools] packages`` would be left out of the wheel."""
    setup = pyproject["tool"]["setuptools"]
    found = {os.path.relpath(folder, ROOT).replace(os.sep, ".")
             for folder, _, files in os.walk(os.path.join(ROOT, "frcnn")) if "__init__.py" in files}
    listed = set(setup["packages"])
    assert listed - {"frcnn.configs"} == found, "pyproject.toml: list every package of frcnn/ in [tool.setuptools]"
    assert setup["package-dir"] == {"frcnn.configs": "configs"}
    assert setup["package-data"]["frcnn.configs"] == ["*.yaml"]


def test_version_has_one_source(pyproject):
    import frcnn

    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "frcnn.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", frcnn.__version__)


def test_requirements_install_the_package_with_existing_extras(pyproject):
    """requirements.txt (the README's set-up) installs this checkout with extras that pyproject.toml defines."""
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    lines = [line for line in lines if line]
    assert len(lines) == 1, lines
    match = re.fullmatch(r"-e \.\[([a-z,]+)\]", lines[0])
    assert match, lines[0]
    extras = set(match.group(1).split(","))
    assert extras == {"tensorflow", "jax", "test"}
    assert {"tensorflow", "jax", "torch", "test"} <= set(pyproject["project"]["optional-dependencies"])


def _build_wheel(workdir):
    """Build the wheel with setuptools' PEP 517 backend from a copy of what it reads; returns the wheel's path."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the 64 that pyproject.toml asks for")
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("frcnn", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    out = workdir / "dist"
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_wheel(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_installed_wheel_finds_its_configs(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        site = tmp_path / "site-packages"
        z.extractall(site)
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    assert {f"frcnn/configs/{name}" for name in configs} <= names
    assert {f"frcnn/cli/{tool}.py" for tool in TOOLS} <= names
    assert not any(name.startswith(("tests/", "tools/", "configs/")) for name in names)
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "frcnn-train = frcnn.cli.train:main" in open(site / entry_points, encoding="utf-8").read()

    # The unpacked wheel alone on the path, away from the checkout: the configs come from inside the package.
    code = ("import frcnn, frcnn.config as c; "
            "cfg = c.load_config('voc.yaml', ['data.classes=[cat]']); "
            "print(frcnn.__file__); print(c.CONFIG_DIR); print(cfg.input.max_size)")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    module, config_dir, max_size = done.stdout.split()
    assert module == str(site / "frcnn" / "__init__.py")
    assert config_dir == str(site / "frcnn" / "configs")
    assert max_size == "1000"


def test_checkout_finds_its_configs():
    from frcnn.config import CONFIG_DIR

    assert os.path.samefile(CONFIG_DIR, os.path.join(ROOT, "configs"))
