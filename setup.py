"""Shim for `python setup.py install`; the package is described in pyproject.toml."""

from setuptools import setup

setup()
