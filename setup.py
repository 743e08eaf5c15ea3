"""Builds the optional CUDA extension ``fastjepa._C`` (csrc/, through CMakeLists.txt) next to the
pure-Python package; the metadata lives in pyproject.toml.

FASTJEPA_BUILD_CUDA=auto (default) builds it when nvcc is found ($CUDACXX or nvcc on PATH) and
installs without it, with a warning, when that build fails; =1 requires it (no nvcc or a
failed build is an error); =0 skips it. The module lands inside the ``fastjepa`` package, so
``import fastjepa._C`` works from regular and editable installs. CMAKE_BUILD_PARALLEL_LEVEL
sets the number of compile jobs (default: the CPU count).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError
except ImportError:  # setuptools < 59
    from distutils.errors import CompileError

ROOT = Path(__file__).resolve().parent
MODES = ("auto", "0", "1")


def build_mode() -> str:
    mode = os.environ.get("FASTJEPA_BUILD_CUDA", "auto").strip().lower()
    if mode not in MODES:
        sys.exit(f"FASTJEPA_BUILD_CUDA={mode!r}: use auto (build the CUDA extension when nvcc is found), 1 (require it) or 0 (skip it)")
    return mode


def find_nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_package  # the PyPI wheel, when its script is not on PATH
        except ImportError:
            raise CompileError("fastjepa._C needs CMake >= 3.24: pip install cmake") from None
        cmake = str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
    return cmake


class CMakeExtension(Extension):
    def __init__(self, name: str, nvcc: str, required: bool):
        super().__init__(name, sources=[], optional=not required)
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            import pybind11
        except ImportError:
            raise CompileError("fastjepa._C needs pybind11: pip install pybind11") from None
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "module"
        configure = [
            find_cmake(), "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DFASTJEPA_BUILD_PYTHON_MODULE=ON",
            "-DFASTJEPA_BUILD_BENCHES=OFF",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        try:
            subprocess.run(configure, check=True)
            subprocess.run([find_cmake(), "--build", str(build_dir), "--target", "_C", "--parallel", jobs], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise CompileError(f"building fastjepa._C with CMake failed: {e}") from e
        built = sorted(out_dir.glob("_C*.so")) + sorted(out_dir.glob("_C*.pyd"))
        if not built:
            raise CompileError(f"CMake built no _C module in {out_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


def extensions() -> list[Extension]:
    mode = build_mode()
    if mode == "0":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            sys.exit("FASTJEPA_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or put nvcc on PATH), so fastjepa._C cannot be built")
        return []
    return [CMakeExtension("fastjepa._C", nvcc, required=mode == "1")]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
