"""Nothing at the repository root shadows an installed distribution.

``python -m ...``, ``python -c``, a REPL and a notebook started in the checkout put the root
first on ``sys.path``. A root folder with an ``__init__.py`` is then imported under its bare
name ahead of site-packages: the old ``kernels/__init__.py`` hid Hugging Face's ``kernels``,
which transformers >= 5.25 imports. The Triton sources stay in ``kernels/`` without an
``__init__.py`` and are imported only as ``fastjepa.kernels`` (``fastjepa/kernels`` links there).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, *flags: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_no_root_folder_is_a_regular_package():
    packages = [d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "fastjepa" and (d / "__init__.py").exists()]
    assert packages == [], f"{packages} would shadow installed distributions of the same name when run from the root"


def test_an_installed_kernels_distribution_wins_from_the_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = 'the installed kernels'\n")
    (site / "kernels-9.9.dist-info").mkdir()
    (site / "kernels-9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9\n")
    done = run_from_root("import kernels; print(kernels.STAND_IN)", env_extra={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the installed kernels"


def test_root_names_run_no_project_code_when_nothing_is_installed():
    """Without site-packages (-S), what the root's folders give under their bare names is at most
    an empty implicit namespace package: no module of ours runs, and any installed package outranks it."""
    code = ("import importlib.util\n"
            "for name in ('kernels', 'benchmarks', 'tests', 'configs', 'csrc'):\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    print(name, None if spec is None else spec.origin)\n")
    done = run_from_root(code, "-S")
    assert done.returncode == 0, done.stderr
    origins = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert set(origins) == {"kernels", "benchmarks", "tests", "configs", "csrc"}
    assert all(origin == "None" for origin in origins.values()), origins


def test_fastjepa_kernels_import_from_the_root_and_from_elsewhere(tmp_path):
    code = "import fastjepa.kernels.attention as a, fastjepa.kernels.gather, fastjepa.kernels.ema; print(a.__name__)"
    for cwd in (ROOT, tmp_path):
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "fastjepa.kernels.attention"


def test_transformers_builds_an_ijepa_model_from_the_root():
    pytest.importorskip("transformers", reason="transformers is not installed (the hf and test extras install it)")
    code = ("from transformers import IJepaConfig, IJepaModel\n"
            "config = IJepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)\n"
            "print(type(IJepaModel(config)).__name__)\n")
    done = run_from_root(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "IJepaModel"


def test_the_wheel_holds_fastjepa_kernels_and_nothing_from_the_root(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    env = {**os.environ, "FASTJEPA_BUILD_CUDA": "0"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(ROOT)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastjepa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for kernel in ("attention", "gather", "ema"):
        assert f"fastjepa/kernels/{kernel}.py" in names
    assert "fastjepa/configs/vit_b16_in1k.yaml" in names
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"fastjepa", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
