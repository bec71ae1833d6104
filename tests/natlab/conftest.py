"""Fixtures for tests that need the NAT lab (real NATs in Linux network namespaces).

Every test in this directory is marked ``natlab`` (deselect with ``-m "not natlab"``); the
``nat_lab`` fixture skips the test, with the reason, when a lab cannot be built here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from conec_trio import certs

from .lab import COORD_IP, LabFactory, NatLab, available, remove_stale_labs

_HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "natlab: needs the NAT lab (root, ip, nft); skipped when unavailable"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.natlab)


@pytest.fixture(scope="session")
def _natlab_ready() -> None:
    ok, reason = available()
    if not ok:
        pytest.skip(f"NAT lab unavailable: {reason}")
    remove_stale_labs()  # left by earlier runs that were killed


@pytest.fixture
def nat_lab(_natlab_ready: None) -> Iterator[LabFactory]:
    """A factory ``make(symmetric=(), loss_percent=0.0) -> NatLab`` returning a lab that is
    up; every lab it made is torn down when the test ends, whatever the outcome."""
    labs: list[NatLab] = []

    def make(*, symmetric: Iterable[str] = (), loss_percent: float = 0.0) -> NatLab:
        lab = NatLab(symmetric=symmetric, loss_percent=loss_percent)
        labs.append(lab)
        lab.up()
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in reversed(labs):
            try:
                lab.down()
            except Exception as exc:  # tear down the others regardless
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def coord_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The coordinator's certificate (valid for its lab IP) and key, as files."""
    directory = tmp_path_factory.mktemp("natlab-coord")
    cert, key = certs.self_signed_cert([COORD_IP])
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    return directory / "cert.pem", directory / "key.pem"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the timings natlab tests recorded with ``record_property("timing", ...)``."""
    lines = [
        f"{report.nodeid.split('::')[-1]}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport) and report.when == "call"
        for name, value in report.user_properties
        if name == "timing"
    ]
    if lines:
        terminalreporter.section("NAT lab timings")
        for line in lines:
            terminalreporter.write_line(line)
