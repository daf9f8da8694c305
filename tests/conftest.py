"""Under pytest-xdist (``--dist loadgroup``, see pyproject.toml) each test module runs in one
worker, so its module-scoped fixtures (synthetic data, a reference training run) are built once."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.parent.name == "tests":
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
