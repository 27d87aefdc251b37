"""Build the optional C speedups; segq installs and works without them (pure Python)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("segq._speedups", ["segq/_speedups.c"], optional=True)])
