"""Examples in docstrings are tests."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import segq

MODULES = sorted(name for _, name, _ in pkgutil.iter_modules(segq.__path__, "segq."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
