"""Gin plumbing: find gin files, check every binding against what the project defines, then hand them to gin.

`--gin_file=gin/x.gin` and `include 'gin/models/y.gin'` resolve, in order,
against the path as given (absolute, relative to the working directory, or
`gs://...`), the repository checkout this package was imported from, and the
copy of `gin/` installed inside the package by setup.py.

Before gin sees anything, the files and bindings are read here with gin's
public parser (`gin.config_parser`), includes expanded, a file's `import
module` lines imported (so that what they register is known), and every
statement checked: an unknown configurable or parameter, a macro used but
never defined and a macro defined but never used each become one `UserError`
naming the file, the line and the nearest known name. Gin then parses the
expanded text (`gin.parse_config`). The UPPER_CASE macros users edit are
checked for type and range (`MACROS`) before anything runs.

Only gin's public API is used; setup.py pins the gin-config versions this
was checked with.
"""

import difflib
import importlib
import os
import re

import gin
from gin import config_parser

from trainer import registry
from trainer.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)


# The macros users edit: name -> (what it is, check). A check returns an error text or None.
def _int_in(lo, hi):
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"an integer in [{lo}, {hi}]"
    return check


def _text(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def _optional_text(v):
    return None if v is None or (isinstance(v, str) and v) else "a non-empty string or None"


def _policy(v):
    return None if v is None or isinstance(v, str) else "an augmentation policy string or None"


MACROS = {
    "DATA_DIR": ("dataset directory in the Tiny ImageNet layout (local or gs://)", _text),
    "MODEL_DIR": ("where checkpoints, logs and the export go (or --model_dir)", _optional_text),
    "IMAGE_SIZE": ("input resolution in pixels", _int_in(8, 1024)),
    "BATCH_SIZE": ("global batch size", _int_in(1, 1 << 20)),
    "EPOCHS": ("epochs of this phase", _int_in(1, 100_000)),
    "NUM_CLASSES": ("classes in the dataset (its wnids.txt)", _int_in(2, 1 << 20)),
    "SEED": ("seeds weights, data order and augmentation", _int_in(0, 2**31 - 1)),
    "AUGMENT": ("augmentation policy (python -m trainer.data.augment --list)", _policy),
}


def search_roots():
    """Directories that `gin/...` paths are resolved against, most specific first."""
    roots = [os.getcwd()]
    for root in (_REPO_DIR, _PACKAGE_DIR):
        # common.gin marks the project's gin/ (site-packages/gin is gin-config itself).
        if os.path.isfile(os.path.join(root, "gin", "common.gin")) and root not in roots:
            roots.append(root)
    return roots


def available_gin_files():
    """Runnable and includable gin files that ship with the project, as `gin/...` paths."""
    found = set()
    for root in search_roots()[1:] or search_roots():
        for dirpath, _, files in os.walk(os.path.join(root, "gin")):
            found.update(os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith(".gin"))
    return sorted(found)


def _exists(path):
    if "://" in path:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        return tf.io.gfile.exists(path)
    return os.path.isfile(path)


def _read(path):
    try:
        if "://" in path:
            import tensorflow as tf  # pylint: disable=import-outside-toplevel

            with tf.io.gfile.GFile(path, "rb") as f:
                return f.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                        "expected a gin file in UTF-8; save it as UTF-8.") from None


def resolve_gin_file(path):
    """Returns a readable path for `path`, or raises UserError naming the candidates."""
    if _exists(path):
        return path
    if not os.path.isabs(path) and "://" not in path:
        for root in search_roots():
            candidate = os.path.join(root, path)
            if os.path.isfile(candidate):
                return candidate
    known = available_gin_files()
    close = difflib.get_close_matches(path, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"Gin file '{path}' not found (looked in: {', '.join(search_roots())}).{hint} "
        f"Gin files shipped with the project: {', '.join(known) or 'none'}.")


class _Recorder(gin.config.ParserDelegate):
    """Gin's parser delegate, recording the macros and configurables the values refer to."""

    def __init__(self):
        super().__init__(skip_unknown=True)
        self.macros = []
        self.references = []

    def macro(self, name):
        self.macros.append(name)
        return super().macro(name)

    def configurable_reference(self, scoped_selector, evaluate):
        self.references.append(scoped_selector.rsplit("/", 1)[-1])
        return super().configurable_reference(scoped_selector, evaluate)


class _Expanded:
    """Gin files and bindings with includes expanded, and what their statements bind and use."""

    def __init__(self):
        self.text = []  # Gin text, includes replaced by the included files' text.
        self.bindings = []  # (statement, where) for every `selector.param = value`.
        self.defined = {}  # macro -> where it was (last) defined.
        self.used = {}  # macro -> where it was first used.
        self.references = []  # (selector, where)

    def add(self, text, source, depth=0):
        if depth > 20:
            raise UserError(f"Invalid gin configuration: {source} includes itself (include depth over 20).")
        lines = text.splitlines(keepends=True)
        recorder = _Recorder()
        include_lines = {}
        try:
            statements = list(config_parser.ConfigParser(text, recorder))
        except SyntaxError as err:
            line = f", line {err.lineno}" if err.lineno else ""
            raise UserError(f"Invalid gin configuration: {source}{line}: {_syntax_message(err)}") from None
        except Exception as err:  # tokenize.TokenError: an unclosed bracket.
            raise UserError(f"Invalid gin configuration: {source}: {err}") from None
        for statement in statements:
            where = f"{source}, line {statement.location.line_num}"
            if isinstance(statement, config_parser.IncludeStatement):
                include_lines[statement.location.line_num] = statement.filename
            elif isinstance(statement, config_parser.ImportStatement):
                _import(statement, where)
            elif isinstance(statement, config_parser.BindingStatement):
                if not statement.arg_name and "." not in statement.selector and not statement.scope:
                    self.defined[statement.selector] = where
                else:
                    self.bindings.append((statement, where))
        # Macros and references are recorded per text, not per statement: attribute them to the source.
        for name in recorder.macros:
            self.used.setdefault(name, source)
        self.references += [(selector, source) for selector in recorder.references]
        for number, line in enumerate(lines, start=1):
            if number in include_lines:
                path = resolve_gin_file(include_lines[number])
                self.add(_read(path), path, depth + 1)
                self.text.append("\n")
            else:
                self.text.append(line if line.endswith("\n") else line + "\n")


def _import(statement, where):
    """Imports a gin file's `import module` now, so that the configurables it registers are checked like the
    project's own (a data source of your own: docs/datasets.md). Gin imports it again, a no-op."""
    from trainer.data import sources  # pylint: disable=import-outside-toplevel

    module = statement.module
    if module.startswith("__gin__"):
        return
    try:
        importlib.import_module(module)
    except ImportError as err:
        also = " (in gin, `from package import name` imports a module: name must be one)" if statement.is_from else ""
        raise UserError(f"Invalid gin configuration: {where}: {module}{also} "
                        f"{sources.import_failure(module, err)}") from None


def _syntax_message(err):
    """Gin's parse error in words; a bare word where a value belongs (`AUGMENT=flip(0.5)`) says to quote it."""
    text = (err.text or "").strip()
    name, equals, value = text.partition("=")
    if "malformed node or string" in str(err.msg) and equals and value.strip():
        if re.fullmatch(r"[\w.]+(\(\))?", value.strip()) and _match(value.strip().rstrip("()")):
            return f"'{value.strip()}' names a configurable: write @{value.strip()} to pass it."
        quoted = f"{name.strip()} = '{value.strip()}'"
        return (f"'{value.strip()}' is not a gin value: quote text, {quoted} (on the command line: "
                f"--gin_bindings=\"{quoted}\").")
    return f"{err.msg}: {text}"


def _match(selector):
    """The registered configurables `selector` names (gin matches any dotted suffix)."""
    if selector in registry.CONFIGURABLES:
        return [selector]
    return [s for s in registry.CONFIGURABLES if s.endswith("." + selector)]


def _nearest(name, candidates):
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check(expanded):
    """Raises UserError for the first unknown name or unused/undefined macro."""
    params = {f"{s}.{p}" for s in registry.CONFIGURABLES for p in (registry.parameters(s) or [])}
    builtin = ("gin.", "macro", "constant", "singleton")
    for statement, where in expanded.bindings:
        selector = statement.selector
        if selector.startswith(builtin):
            continue
        matches = _match(selector)
        full = f"{selector}.{statement.arg_name}"
        if not matches:
            raise UserError(f"Invalid gin configuration: {where}: no configurable named '{selector}' "
                            f"(in '{statement.location.line_content.strip()}').{_nearest(full, params)}")
        if len(matches) > 1:
            raise UserError(f"Invalid gin configuration: {where}: '{selector}' could be any of "
                            f"{', '.join(matches)}: write it in full.")
        accepted = registry.parameters(matches[0])
        if accepted is not None and statement.arg_name not in accepted:
            raise UserError(f"Invalid gin configuration: {where}: '{matches[0]}' has no parameter "
                            f"'{statement.arg_name}'.{_nearest(f'{matches[0]}.{statement.arg_name}', params)} "
                            f"It takes: {', '.join(accepted)}.")
    for selector, where in expanded.references:
        if not selector.startswith(builtin) and not _match(selector):
            raise UserError(f"Invalid gin configuration: {where}: '@{selector}' is not a configurable."
                            f"{_nearest(selector, registry.CONFIGURABLES)}")
    for name, where in expanded.used.items():
        if name not in expanded.defined:
            hint = _nearest(name, expanded.defined).replace("Did you mean '", "Did you mean '%")
            raise UserError(f"Invalid gin configuration: the macro %{name} is used but never defined.{hint} "
                            f"(used in {where})")
    for name, where in expanded.defined.items():
        if name not in expanded.used and name not in MACROS:  # (Tools read the known macros: plan, IMAGE_SIZE.)
            raise UserError(f"Invalid gin configuration: {where}: the macro {name} is set but no gin file uses "
                            f"it.{_nearest(name, set(expanded.used) | set(MACROS))}")


def check_macros():
    """Checks the type and range of every UPPER_CASE macro users edit that is defined.

    Raises:
      UserError: naming the macro, what it must be and what it is.
    """
    for name, (_, check) in MACROS.items():
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError:
            continue  # Not defined in this configuration.
        expected = check(value)
        if expected:
            raise UserError(f"{name} must be {expected}, got {value!r}.")


def parse_gin(gin_files, gin_bindings=(), model_dir=None, defaults=()):
    """Checks, then parses gin files and bindings (later wins); `model_dir` overrides MODEL_DIR.

    The modules defining the configurables must be imported first (the entry
    points import `trainer.train`, which imports them all).

    Args:
      gin_files: gin file paths (see the module docstring for how they resolve).
      gin_bindings: extra bindings, applied after the files.
      model_dir: if set, binds the `MODEL_DIR` macro after everything else.
      defaults: bindings applied *before* the files (e.g. a default
        `NUM_CLASSES` for tools that read a model file on its own).

    Raises:
      UserError: a missing file, a syntax error, an unknown name or an unused
        macro (with the file, the line and the nearest known name), or a macro
        of the wrong type or range.
    """
    expanded = _Expanded()
    for i, binding in enumerate(defaults):
        expanded.add(binding, f"default binding {i + 1}")
    for path in gin_files:
        resolved = resolve_gin_file(path)
        expanded.add(_read(resolved), resolved)
    for binding in gin_bindings:
        expanded.add(binding, f"--gin_bindings={binding!r}")
    if model_dir:
        expanded.add(f"MODEL_DIR = {model_dir!r}", "--model_dir")
    _check(expanded)
    try:
        gin.parse_config("".join(expanded.text))
    except (ValueError, TypeError, SyntaxError) as err:
        raise UserError(f"Invalid gin configuration: {str(err).strip()}") from None
    check_macros()


def require(*selectors):
    """Checks that gin binds every argument without a default of the configurables `selectors`.

    Raises:
      UserError: naming the configurable and the arguments that have no value.
    """
    import inspect  # pylint: disable=import-outside-toplevel

    for selector in selectors:
        fn = registry.CONFIGURABLES[selector]
        bound = gin.get_bindings(selector)
        missing = [name for name, p in inspect.signature(fn).parameters.items()
                   if p.default is inspect.Parameter.empty and name not in bound
                   and name not in registry.DENIED[selector]]
        if missing:
            raise UserError(f"Invalid gin configuration: {selector} needs a value for {', '.join(missing)}: include "
                            "gin/common.gin and define its macros (as the runnable files in gin/ do), or bind them "
                            "with --gin_bindings.")


def describe_macros():
    """The macros users edit, one line each, for `trainer.main --help`."""
    return "\n".join(f"  {name:<12} {what}" for name, (what, _) in MACROS.items())
