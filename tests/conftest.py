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
    rank = {}
    for item in items:
        group = PLANNED if "planned" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(name=group))
        rank[item.nodeid] = FIRST.index(group) if group in FIRST else len(FIRST)
    items.sort(key=lambda item: rank[item.nodeid])  # stable: the order within each group stays
