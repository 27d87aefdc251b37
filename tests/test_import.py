"""Start-up cost: `import segq` and the CLI load only what they use (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import segq

_HEAVY = ["asyncio", "psutil", "portalocker", "segq.aio", "segq.workqueue", "segq.recovery", "secrets"]


def _modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which of the heavy modules it imported."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {_HEAVY!r} if m in sys.modules]))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(segq.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_import_segq_loads_no_asyncio_psutil_portalocker_work_queue_or_recovery() -> None:
    assert _modules_after("import segq") == []


def test_importing_the_cli_loads_no_recovery_code_until_a_command_needs_it() -> None:
    assert _modules_after("import segq.cli") == []


def test_opening_a_sender_loads_the_os_lock_libraries_but_not_asyncio(tmp_path: object) -> None:
    loaded = _modules_after(f"import segq\nsegq.Sender({str(tmp_path)!r}, segment_size=1 << 16).close()")
    assert "portalocker" in loaded and "psutil" in loaded
    assert "asyncio" not in loaded and "segq.workqueue" not in loaded


@pytest.mark.parametrize("name", sorted(segq._LAZY))
def test_every_lazily_loaded_name_resolves_to_the_object_its_module_defines(name: str) -> None:
    value = getattr(segq, name)
    module = getattr(segq, segq._LAZY[name])
    assert value is (module if name == segq._LAZY[name] else getattr(module, name))


def test_star_import_and_dir_list_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from segq import *", namespace)
    assert set(segq.__all__) <= set(namespace)
    assert set(segq.__all__) <= set(dir(segq))


def test_an_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        segq.no_such_thing  # noqa: B018
