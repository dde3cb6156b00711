"""The notebooks run top to bottom under pytest through nbmake (``addopts = "--nbmake"``).

They load the real SmolLM2 (and profile it), so they carry the ``real_model`` marker:
``pytest -m "not real_model"`` skips them with the other real-model tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb" and HERE in item.path.parents:
            item.add_marker(pytest.mark.real_model)
