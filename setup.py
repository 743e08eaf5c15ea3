# Metadata lives in pyproject.toml. This file stays so that the optional CUDA
# extension (csrc/, built with CMake) can hook into the build in a later step.
from setuptools import setup

setup()
