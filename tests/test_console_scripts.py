"""Every console script of setup.py prints the same help as its `python -m` form, and exits 0."""

import importlib
import os
import re
import subprocess
import sys

import pytest

import helpers

REPO = helpers.REPO


def _console_scripts():
    """(name, the module `python -m` runs, the entry point's module, its function) for each console script."""
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    return [(name, getattr(importlib.import_module(module), function).module, module, function)
            for name, module, function in re.findall(r'"(tiny-[\w-]+) = ([\w.]+):(\w+)"', text)]


SCRIPTS = _console_scripts()

# What pip's console-script wrapper does (`pip install` writes it to bin/<name>): import the module, call the
# function. Run from the repository, so it is this checkout's `trainer` that answers. At exit it says whether
# TensorFlow was loaded.
WRAPPER = ("import atexit, re, sys\nfrom {module} import {function}\n"
           "atexit.register(lambda: print('tensorflow loaded:', 'tensorflow' in sys.modules, file=sys.stderr))\n"
           "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\nsys.exit({function}())")


def _run(args):
    return subprocess.run(args, cwd=REPO, env=helpers.env(), capture_output=True, text=True, timeout=120,
                          check=False)


def test_setup_declares_every_command():
    assert {name for name, _, _, _ in SCRIPTS} >= {"tiny-train", "tiny-plan", "tiny-evaluate", "tiny-predict",
                                                "tiny-export", "tiny-compare", "tiny-preview", "tiny-synthetic",
                                                "tiny-download"}


@pytest.mark.parametrize("name,module,entry_module,function", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_console_script_help_is_the_python_m_help_and_loads_no_tensorflow(name, module, entry_module, function):
    as_module = _run([sys.executable, "-m", module, "--help"])
    as_script = _run([sys.executable, "-c", WRAPPER.format(module=entry_module, function=function), "--help"])
    assert as_module.returncode == 0 and as_script.returncode == 0, as_script.stderr[-2000:]
    assert as_script.stdout == as_module.stdout
    assert as_script.stderr.strip().endswith("tensorflow loaded: False"), as_script.stderr[-2000:]
    assert "USAGE:" not in as_script.stdout and "Try --helpfull" not in as_script.stdout
    assert f"python -m {module}" in as_script.stdout  # The module's own description, not absl's one-liner.
    assert re.search(r"^\s+--\w+", as_script.stdout, re.M), as_script.stdout  # It lists flags.
    for flag in _defined_flags(module):  # Every flag the command defines is in its help.
        assert f"--{flag}" in as_script.stdout, (name, flag)
    if name == "tiny-train":
        assert {"gin_file", "gin_bindings", "model_dir"} <= _defined_flags(module)


def _defined_flags(module):
    """The flags a command's module defines: its `flags.DEFINE_*("name"` calls and `cli.define_gin_flags(...)`."""
    source = open(os.path.join(REPO, *module.split(".")) + ".py", encoding="utf-8").read()
    found = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source))
    for call in re.findall(r"cli\.define_gin_flags\(([^)]*)\)", source):
        found |= {"gin_file", "gin_bindings"} | (set() if "model_dir=False" in call else {"model_dir"})
    return found


# A command that logs one line, warns, and imports matplotlib (which announces "generated new fontManager" the
# first time it runs with an empty cache directory).
LOGS = ("import sys\nfrom absl import logging\nfrom trainer import cli\n"
        "def main(argv):\n    import matplotlib.pyplot\n    logging.info('hello %s', 'world')\n"
        "    logging.warning('careful')\ncli.run(main)\n")


@pytest.mark.parametrize("verbosity", [None, "1"])
def test_the_console_shows_time_and_message_and_no_font_cache_line(tmp_path, verbosity):
    env = dict(helpers.env(), MPLCONFIGDIR=str(tmp_path / "mpl"))  # An empty font cache: matplotlib rebuilds it.
    args = [sys.executable, "-c", LOGS] + ([f"--verbosity={verbosity}"] if verbosity else [])
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(tmp_path / "mpl"), "matplotlib did not build its font cache: the test proves nothing"
    assert "fontManager" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "hello world" in line or "careful" in line]
    if verbosity is None:
        assert len(lines) == 2 and re.fullmatch(r"\d\d:\d\d:\d\d hello world", lines[0]), result.stderr
        assert re.fullmatch(r"\d\d:\d\d:\d\d warning: careful", lines[1]), result.stderr
    else:  # --verbosity asks for absl's full prefix: level, date, time, thread, file:line.
        assert len(lines) == 2 and re.fullmatch(r"I\d{4} [\d:.]+ +\d+ <string>:\d+\] hello world", lines[0]), \
            result.stderr


def test_the_imports_are_frozen_once_a_process():
    """A later `register_configurables` (export, predict, compare call it again) must not freeze garbage that was
    not collected yet: frozen, it would never be."""
    import gc  # pylint: disable=import-outside-toplevel

    from trainer import cli  # pylint: disable=import-outside-toplevel

    cli.register_configurables()  # conftest made the first call.
    cycles = [[] for _ in range(100)]
    for cycle in cycles:
        cycle.append(cycle)
    del cycles, cycle
    frozen = gc.get_freeze_count()
    cli.register_configurables()
    assert gc.get_freeze_count() == frozen
