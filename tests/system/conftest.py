"""Everything under tests/system/ is a system test (processes, kills, the UI, end-to-end runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark this folder's tests ``system``, so ``-m "not system"`` leaves them out."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.system)
