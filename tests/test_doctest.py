"""Examples in docstrings are tests."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import tempfile

import pytest

import segq

MODULES = sorted(name for _, name, _ in pkgutil.iter_modules(segq.__path__, "segq."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples make their queues with tempfile.mkdtemp(): keep them in
    # the test's directory, so the run leaves nothing in /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
