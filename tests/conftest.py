"""Grouping for the parallel run of scripts/test.sh (pytest-xdist, ``-n 2 --dist loadgroup``).

Every test that uses the session's planned nnU-Net dataset (the ``planned`` fixture) goes to one worker,
so that the dataset is planned once; every other test file stays whole on one worker, so that its module
fixtures are built once. The longest groups come first (the planned one, then the small quickstart run):
a worker that started one of them last would leave the other core idle at the end.
"""
import pytest

PLANNED = "planned_dataset"
FIRST = (PLANNED, "tests/scripts/test_quickstart.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(name=_group(item)))
    # stable: the order within each group stays
    items.sort(key=lambda item: FIRST.index(_group(item)) if _group(item) in FIRST else len(FIRST))


def _group(item):
    return PLANNED if "planned" in item.fixturenames else item.nodeid.split("::")[0]
