"""Fixtures for lab tests (tests/lab): a real two-node lab in network namespaces.

`lab` gives a Lab that is up (built once per test module, prefix "mht-") and puts it back to
its initial state after each test: partition healed, every cable plugged, no impairment.
`lab_available` only skips, with the exact reason, when this machine cannot run a lab.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.lab import Lab, unavailable_reason

LAB_PREFIX = "mht-"


def require_lab() -> None:
    """Skip the calling test, saying exactly why, when the lab cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lab_available() -> None:
    require_lab()


@pytest.fixture(scope="module")
def lab_module() -> Iterator[Lab]:
    require_lab()
    lab = Lab(prefix=LAB_PREFIX)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lab(lab_module: Lab) -> Iterator[Lab]:
    try:
        yield lab_module
    finally:
        if lab_module.is_up:
            lab_module.reset_faults()
