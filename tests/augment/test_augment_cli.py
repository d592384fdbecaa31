"""`python -m trainer.data.augment`: --list prints every op with its arguments; --help is quick; bad flags are clean."""

import os
import subprocess
import sys

import pytest

import augment_helpers as h


def _run_module(*args):
    env = dict(os.environ, PYTHONPATH=h.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "trainer.data.augment", *args], cwd=h.REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_list_prints_every_op_with_its_arguments_and_description():
    result = _run_module("--list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "flip(p=0.5)\n    Horizontal flip" in out
    assert "coarse_dropout(p=0.2, size_percent=0.02, min_grid=4)\n    imgaug CoarseDropout" in out
    assert "brightness(lo=0.5, hi=1.5, per_channel=0.0, random_sign=False, clip=True)" in out
    assert "sometimes(p, then, otherwise=None)" in out
    for name in h.OP_SPECS:
        assert f"\n{name}(" in "\n" + out, name


@pytest.mark.slow
def test_op_prints_one_op_and_unknown_op_is_a_clean_error():
    result = _run_module("--op", "rotate")
    assert result.returncode == 0 and result.stdout.startswith("rotate(lo=-45.0")
    assert "flip(" not in result.stdout
    result = _run_module("--op", "rotat")
    assert result.returncode == 2 and "Unknown augmentation op 'rotat'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_does_not_import_tensorflow_and_bad_flags_exit_cleanly():
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('trainer.data.augment', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None)\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=h.REPO, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=h.REPO), check=False)
    assert result.returncode == 0, result.stderr
    assert "--list" in result.stdout
    result = _run_module("--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
    assert "Traceback" not in result.stderr
