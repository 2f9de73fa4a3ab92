"""Builds meshgw: the connection set-up path compiled with mypyc, or everything pure Python.

Everything else is declared in pyproject.toml; this file only decides about the C extensions.

A wheel (`pip install .`, `pip wheel .`) is compiled when mypyc (from mypy, a build requirement)
and a C compiler that finds the Python headers are at hand, and pure Python otherwise: the same
typed source either way, and `meshgw --version` says which one runs. Which modules are compiled is
listed in meshgw/buildinfo.py.

    MESHGW_X_PURE=1       never compile
    MESHGW_X_COMPILED=1   compile or fail: no fallback to pure Python (CI, release builds)

Editable installs (`pip install -e .`) are always pure Python. Compiled modules would sit beside
their source and be imported instead of it, so an edit would silently not run until the next
rebuild; an editable install exists for edits to run. For the same reason compiling into the
source tree (`setup.py build_ext --inplace`) is refused. To run the compiled build, install a wheel
into another virtualenv (docs/build.md).
"""

from __future__ import annotations

import os
import runpy
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = Path(__file__).resolve().parent
PURE_ENV = "MESHGW_X_PURE"
COMPILED_ENV = "MESHGW_X_COMPILED"
COMPILED_MODULES: tuple[str, ...] = runpy.run_path(str(HERE / "meshgw" / "buildinfo.py"))[
    "COMPILED_MODULES"
]
# The shared library mypyc puts every compiled module's code in: meshgw__mypyc.<suffix>.
GROUP = "meshgw"
# Stands for mypyc's extensions until BuildMypyc generates them; it makes the wheel
# platform-specific.
PLACEHOLDER = [Extension(f"{GROUP}__mypyc", sources=[])]
METADATA_COMMANDS = frozenset({"egg_info", "dist_info", "sdist"})


def say(message: str) -> None:
    print(f"meshgw build: {message}", file=sys.stderr)


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def cannot_compile() -> str | None:
    """Why no mypyc extension can be built here, or None when one can."""
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, this is {sys.implementation.name}"
    try:
        import mypyc.build  # noqa: F401
    except ImportError as error:
        return f"mypyc is not installed ({error})"
    # Compile a file that includes Python.h: finds a missing compiler and missing headers alike.
    # (distutils is setuptools' own copy here, the one build_ext compiles with.)
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory(prefix="meshgw-cc-") as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint meshgw_probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [str(probe)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except (BaseError, CCompilerError, OSError) as error:
            return f"no C compiler that builds against the Python headers ({error})"
    return None


def want_compiled() -> bool:
    """The decision, made on every setup.py run (pip runs it three times); mypyc itself runs
    only when the extensions are built (BuildMypyc)."""
    required = flag(COMPILED_ENV)
    if flag(PURE_ENV):
        if required:
            sys.exit(f"meshgw build: {PURE_ENV} and {COMPILED_ENV} are both set: choose one")
        say(f"pure Python ({PURE_ENV} is set)")
        return False
    if "editable_wheel" in sys.argv:
        if required:
            sys.exit(
                f"meshgw build: {COMPILED_ENV} is set, but editable installs are always pure "
                "Python (compiled modules would shadow edits to the source); install a wheel "
                "instead: pip install ."
            )
        say("pure Python (an editable install: edits to the source must run)")
        return False
    problem = cannot_compile()
    if problem is None:
        return True
    if required:
        sys.exit(f"meshgw build: {COMPILED_ENV} is set, but cannot compile: {problem}")
    say(f"pure Python: {problem}")
    return False


class BuildMypyc(build_ext):
    """Generates the C with mypyc when the extensions are about to be built, and only then."""

    def finalize_options(self) -> None:
        # Also finalized to list sources for metadata (pip's first two setup.py runs): mypyc
        # takes seconds, and is not needed for that. Once per run: a wheel finalizes twice.
        building = not set(self.distribution.commands) <= METADATA_COMMANDS
        if building and self.distribution.ext_modules is PLACEHOLDER:
            if self.inplace:
                sys.exit(
                    "meshgw build: refusing to compile into the source tree: the compiled modules "
                    "would be imported instead of the source beside them, so edits would not "
                    "run. Build a wheel instead: pip install ."
                )
            build_base = self.get_finalized_command("build").build_base
            try:
                compiled = self.mypycify(os.path.join(build_base, "mypyc"))
            except (Exception, SystemExit) as error:  # mypyc reports its errors by exiting
                compiled = self.fall_back(f"mypyc failed: {error}")
            self.distribution.ext_modules = compiled
        super().finalize_options()

    def fall_back(self, problem: str) -> list[Extension]:
        """Without MESHGW_X_COMPILED a failed compilation still installs meshgw, as pure Python
        (the source is all there: only the extensions are missing)."""
        if flag(COMPILED_ENV):
            sys.exit(f"meshgw build: {COMPILED_ENV} is set, but {problem}")
        say(f"pure Python: {problem}")
        return []

    def mypycify(self, target_dir: str) -> list[Extension]:
        from mypyc.build import mypycify

        say(f"compiling {len(COMPILED_MODULES)} modules with mypyc")
        paths = [str(Path(*name.split("."))) + ".py" for name in COMPILED_MODULES]
        # An ignore comment needed where the runtime dependencies are installed (a developer's
        # mypy run) is unused in the isolated build environment, which lacks them: not an error.
        options = ["--no-warn-unused-ignores"]
        return list(mypycify([*options, *paths], group_name=GROUP, target_dir=target_dir))

    def run(self) -> None:
        try:
            super().run()
        except (BaseError, CCompilerError) as error:
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.fall_back(f"the C compiler failed: {error}")
            return
        # A module compiled by an earlier build in this build/ directory but not by this one
        # would otherwise be packaged, and imported instead of its source.
        built = {Path(output).resolve() for output in self.get_outputs()}
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for found in Path(self.build_lib).rglob(f"*{suffix}"):
            if found.resolve() not in built:
                say(f"removing {found}: not part of this build")
                found.unlink()


if __name__ == "__main__":  # as setuptools runs it; the tests load the functions above
    setup(ext_modules=PLACEHOLDER if want_compiled() else [], cmdclass={"build_ext": BuildMypyc})
