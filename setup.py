"""The one packaging fact pyproject.toml cannot state: which packages to install.

``[tool.setuptools.packages.find]`` cannot list the packages ``[tool.setuptools.package-dir]`` maps from other
folders (``configs/`` and ``data/sample/`` shipped as ``medmm/_resources/...``), so the list is built here:
``medmm*`` and ``encoders*`` as found, plus the mapped ones. Everything else is in pyproject.toml.
"""

import tomllib

from setuptools import find_namespace_packages, setup

with open("pyproject.toml", "rb") as f:
    MAPPED = tomllib.load(f)["tool"]["setuptools"]["package-dir"]  # package -> the repository folder it ships

setup(packages=[*find_namespace_packages(include=["medmm*", "encoders*"]), *MAPPED])
