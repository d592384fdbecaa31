"""A declarative image-classification trainer for Tiny ImageNet (TensorFlow, Keras 3, gin)."""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.2.0"


class _QuietTensorFlowStart(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Keeps TensorFlow's C++ start-up lines (CUDA probing, CPU features) off the console.

    They are written to file descriptor 2 while `tensorflow` is first imported,
    before TF_CPP_MIN_LOG_LEVEL takes effect, so that import runs with fd 2 on
    /dev/null; Python exceptions still reach the console. Set
    TF_CPP_MIN_LOG_LEVEL to 0, 1 or 2 to see what TensorFlow says.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("tensorflow")
        if spec is None:  # Not installed: Python's own "No module named 'tensorflow'".
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            self._loader.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") == "3" and "tensorflow" not in sys.modules:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.meta_path.insert(0, _QuietTensorFlowStart())
