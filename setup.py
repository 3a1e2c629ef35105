"""
The package's metadata lives in pyproject.toml; this file stays for tools
and documents that call setup.py by name.
"""

from setuptools import setup

setup()
