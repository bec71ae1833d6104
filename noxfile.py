"""Developer tasks: ``nox`` runs tests, lint and typecheck; ``nox -s NAME`` runs one session.

Sessions use the Python that runs nox. Extra arguments after ``--`` go to pytest (``tests``)
or to the benchmark runner (``bench``, ``soak``), e.g. ``nox -s tests -- -k broadcast -x``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (network-namespace tests run only as root)."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff (fix with ``ruff check --fix`` / ``ruff format``)."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the library with mypy in strict mode."""
    session.install(".", "mypy")
    session.run("mypy", "conec_trio")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (``nox -s bench -- --help`` for their options)."""
    session.install(".")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run ``conec-trio demo``: a coordinator and a few clients on loopback."""
    session.install(".")
    session.run("conec-trio", "demo")


@nox.session
def soak(session: nox.Session) -> None:
    """Run the long-running soak test (``nox -s soak -- --help`` for its options)."""
    session.install(".[test]")
    session.run("python", "-m", "benchmarks.soak", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation into docs/_build/html; any warning fails the build."""
    session.install(".", "sphinx>=7", "myst-parser>=2")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
