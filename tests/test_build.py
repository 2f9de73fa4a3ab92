"""Which build runs (compiled with mypyc, or pure Python), and how setup.py chooses one.

CI runs the whole suite against both builds (.ci/run); these tests check what holds in each.
"""

from __future__ import annotations

import importlib.util
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from meshgw import __version__
from meshgw.buildinfo import COMPILED, COMPILED_MODULES, PURE, build
from tests.conftest import REPO, WAIT

SETUP = REPO / "setup.py"
PURE_ENV, COMPILED_ENV = "MESHGW_X_PURE", "MESHGW_X_COMPILED"


def test_the_build_is_one_or_the_other_never_a_mix() -> None:
    for name in COMPILED_MODULES:
        assert importlib.util.find_spec(name) is not None, f"{name} is listed but does not exist"
    assert build() in (COMPILED, PURE)


def test_version_names_the_build_that_children_started_from_the_checkout_run() -> None:
    # As the tests start gateways: `python -m meshgw` with the checkout as working folder,
    # which must not put the source tree in place of the meshgw under test.
    done = subprocess.run(
        [sys.executable, "-m", "meshgw", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=WAIT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"meshgw, version {__version__}, {build()}\n"


def test_no_build_puts_compiled_modules_into_the_source_tree() -> None:
    # They would be imported instead of the source beside them: edits would silently not run.
    assert sorted((REPO / "meshgw").rglob("*.so")) == []


# --- setup.py's decision -------------------------------------------------------------------------


@pytest.fixture
def setup_py(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """setup.py's `want_compiled`, run with the given command line and environment."""
    for name in (PURE_ENV, COMPILED_ENV, "CC"):
        monkeypatch.delenv(name, raising=False)
    functions = runpy.run_path(str(SETUP), run_name="meshgw_setup")  # not __main__: no setup()

    def want_compiled(*argv: str, **env: str) -> bool:
        monkeypatch.setattr(sys, "argv", ["setup.py", *argv])
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return bool(functions["want_compiled"]())

    return want_compiled


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_wheel_is_compiled_where_a_compiler_is_at_hand(setup_py: Callable[..., Any]) -> None:
    assert setup_py("bdist_wheel") is True
    assert setup_py("bdist_wheel", **{COMPILED_ENV: "1"}) is True


def test_pure_when_asked(setup_py: Callable[..., Any]) -> None:
    assert setup_py("bdist_wheel", **{PURE_ENV: "1"}) is False
    with pytest.raises(SystemExit, match="choose one"):
        setup_py("bdist_wheel", **{PURE_ENV: "1", COMPILED_ENV: "1"})


def test_editable_installs_are_always_pure(setup_py: Callable[..., Any]) -> None:
    assert setup_py("editable_wheel", "--dist-info-dir", "x") is False
    with pytest.raises(SystemExit, match="editable installs are always pure"):
        setup_py("editable_wheel", "--dist-info-dir", "x", **{COMPILED_ENV: "1"})


def test_without_a_compiler_pure_or_a_clear_failure(
    setup_py: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert setup_py("bdist_wheel", CC="/nonexistent/cc") is False
    assert "pure Python: no C compiler" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot compile: no C compiler"):
        setup_py("bdist_wheel", CC="/nonexistent/cc", **{COMPILED_ENV: "1"})
