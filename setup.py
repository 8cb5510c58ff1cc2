"""Packages of gemma-export: gemma_export and its subpackages, plus the top-level targets/ folder
installed as gemma_export.target_files (its TOML files are package data, see pyproject.toml), so a
wheel carries the build targets. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["gemma_export*"]), "gemma_export.target_files"],
      package_dir={"gemma_export.target_files": "targets"})
