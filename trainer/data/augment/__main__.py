"""Lists the augmentation ops a policy string can use, with their arguments and what they do.

    python -m trainer.data.augment --list
    python -m trainer.data.augment --list --op coarse_dropout

Arguments come from each op's signature (defaults included), the description
from the first line of its docstring.
"""

import argparse
import inspect
import os
import sys


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.augment",
        description="Lists the augmentation ops of policy strings (gin's AUGMENT macro), with their "
                    "arguments and a one-line description.")
    parser.add_argument("--list", action="store_true", help="print every registered op")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="print only this op (repeatable; implies --list)")
    return parser, parser.parse_args(argv)


def describe(name, factory):
    """An op's entry: its call signature (defaults included), then the first line of its docstring.

    Args:
      name: the op's policy name, e.g. 'flip'.
      factory: the registered factory (a class).

    Returns:
      e.g. "flip(p=0.5)\n    Horizontal flip of each image with probability `p` ...".
    """
    doc = inspect.getdoc(factory) or ""
    summary = doc.splitlines()[0] if doc else ""
    return f"{name}{inspect.signature(factory)}\n    {summary}"


def main(argv=None):
    """Runs the command; returns the exit status.

    Args:
      argv: the arguments (default: sys.argv[1:]).

    Returns:
      0 on success, 2 for an unknown op (argparse exits with 2 on bad flags).
    """
    parser, args = _parse_args(sys.argv[1:] if argv is None else argv)
    if not args.list and not args.op:
        parser.print_help()
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer.data import augment  # pylint: disable=import-outside-toplevel  (imports TensorFlow)

    registry = augment.load()
    names = sorted(registry)
    if args.op:
        unknown = [name for name in args.op if name not in registry]
        if unknown:
            print(f"Unknown augmentation op {', '.join(map(repr, unknown))}; known ops: {', '.join(names)}.",
                  file=sys.stderr)
            return 2
        names = args.op
    for name in names:
        print(describe(name, registry[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
