"""The project's gin configurables, each registered once under the `trainer.` namespace.

Gin files name them in full (`trainer.train.epochs`, `trainer.blocks.conv.l2`,
`trainer.optim.adam.learning_rate`), so a configurable of the same short name
from another library (`train`, `conv`, `adam`) can never be bound by mistake.
`CONFIGURABLES` lists them for `trainer.config`, which checks every binding
against it (and suggests the nearest name) before gin sees the files.
"""

import inspect

import gin

from trainer.errors import UserError

CONFIGURABLES = {}  # Full selector ('trainer.blocks.conv') -> the undecorated function or class.
DENIED = {}  # Full selector -> the parameters only the caller sets.


def configurable(module, name=None, denylist=None):
    """Decorator: makes a function gin-configurable as `<module>.<name>` and records it.

    Args:
      module: the gin module, e.g. 'trainer' or 'trainer.blocks'.
      name: the configurable's name; defaults to the function's name.
      denylist: parameters gin may not bind (set by the caller only).

    Returns:
      The decorator.
    """
    def decorator(fn):
        if fn.__module__ == "__main__":  # `python -m` of a module: its imported copy registers it.
            return fn
        short = name or fn.__name__
        existing = CONFIGURABLES.get(f"{module}.{short}")
        if existing is not None and existing.__module__ != fn.__module__:
            raise UserError(f"{fn.__module__} defines {module}.{short}, which {existing.__module__} already "
                            "defines: give it another name.")
        CONFIGURABLES[f"{module}.{short}"] = fn
        DENIED[f"{module}.{short}"] = tuple(denylist or ())
        return gin.configurable(short, module=module, denylist=denylist)(fn)
    return decorator


def parameters(selector):
    """The names gin may bind on the configurable `selector` (a full selector of CONFIGURABLES)."""
    fn = CONFIGURABLES[selector]
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # Takes anything.
    return [p for p in params if p not in ("self", "args") and p not in DENIED[selector]]


def describe(selector):
    """`selector(arg=default, ...)`: one line per configurable, for --help and --list."""
    fn = CONFIGURABLES[selector]
    doc = (inspect.getdoc(fn) or "").split("\n")[0]
    return f"{selector}{inspect.signature(fn)}  {doc}".rstrip()
