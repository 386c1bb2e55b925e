"""pytest plugin (-p scipy_lsa_plugin): run scipy's linear_sum_assignment tests on hetmerge.

Every collected test module's ``linear_sum_assignment`` name is replaced by
hetmerge.ops.linear_assignment before the tests run. The calls made through it and each test's
outcome are written as JSON to $HETMERGE_LSA_REPORT, so the caller can tell that our solver, not
scipy's, was the one tested.
"""
from __future__ import annotations

import json
import os

import pytest

from hetmerge import ops

_calls = 0
_outcomes: dict[str, str] = {}


def linear_sum_assignment(cost_matrix, maximize=False):
    global _calls
    _calls += 1
    return ops.linear_assignment(cost_matrix, maximize=maximize)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "linear_sum_assignment"):
            module.linear_sum_assignment = linear_sum_assignment


def pytest_runtest_logreport(report):
    # A test's outcome is its call phase's, unless setup or teardown failed or skipped it.
    if report.when == "call" or report.outcome != "passed":
        if _outcomes.get(report.nodeid) in (None, "passed"):
            _outcomes[report.nodeid] = report.outcome


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("HETMERGE_LSA_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"calls": _calls, "outcomes": _outcomes, "exitstatus": int(exitstatus)}, f)
