"""Errors a user can fix, said in one message: which file, row, column or config key, and what to do.

`config_error_message` turns jsonargparse's nested parser errors into one line naming the key (with the
closest valid key for an unknown one, by difflib) and where it came from; `user_error_message` does the same
for data errors and other errors that are not bugs. Bugs keep their traceback.
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path

PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
# Config keys that were renamed: an old key fails with a message naming the new one.
RENAMED_KEYS = {"fsdp_layer_classes": "decoder_layer_classes"}
LEAVES = [
    ("unknown", re.compile(r"Option '([^']+)' is not accepted")),
    ("type", re.compile(r"Expected a (.+?)\. Got value: (.*)")),
    ("no_class", re.compile(r"module '([^']+)' has no attribute '([^']+)'")),
    ("no_file", re.compile(r"File does not exist: '?([^'\n]+)'?")),
    ("not_accepted", re.compile(r"does not accept option '([^']+)'")),
    ("unrecognized", re.compile(r"unrecognized arguments: (.*)")),
]


def _readable_type(text: str) -> str:
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    literal = re.match(r"typing\.Literal\[(.*)\]$", text)
    return f"one of {literal.group(1)}" if literal else text


def init_parameters(class_path: str) -> list[str]:
    """Constructor parameters of a class and its bases (what jsonargparse accepts as init_args)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if "__init__" in vars(klass):
            names += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
    return list(dict.fromkeys(names))


def _module_names(module: str) -> list[str]:
    import importlib

    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return []


def closest(word: str, candidates: list[str]) -> str | None:
    """The closest candidate to `word` (difflib), or the new name of a renamed key when that is a candidate."""
    last = word.rsplit(".", 1)[-1]
    if last in RENAMED_KEYS:
        renamed = word[: len(word) - len(last)] + RENAMED_KEYS[last]
        if renamed in candidates or not candidates:
            return renamed
    hits = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return hits[0] if hits else None


def _in_config_files(key: str, argv: list[str]) -> str | None:
    """The --config file (of those on the command line) that sets the dotted `key`, if any."""
    import yaml

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    parts = [p for p in key.split(".") if p != "init_args"]
    for path in reversed(files):
        try:
            node = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in parts:
            if isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part not in node:
                node = node["init_args"]
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return path
    return None


def config_error_message(message: str, keys: list[str], argv: list[str]) -> str:
    """One message for a jsonargparse error: the key, what is wrong, the closest valid key, where it was set.
    `keys` are the subcommand's valid dotted keys (without `--`)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    path: list[str] = []
    class_path = None
    for line in lines:
        if line.startswith("- Expected a <class 'NoneType'>"):
            continue  # the `null` branch of an Optional: never what the user meant
        if match := PARSER_KEY.search(line):
            path.append(match.group(1))
        if match := CLASS_PATH.search(line):
            class_path = match.group(1)
            path.append("init_args")
        for kind, pattern in LEAVES:
            if match := pattern.search(line):
                return _leaf_message(kind, match, path, class_path, keys, argv)
    return message.splitlines()[0] if message else "invalid configuration"


def _config_node(key: str, argv: list[str]):
    """The value at dotted `key` in the last --config file that has it (None if none does)."""
    source = _in_config_files(key, argv)
    if source is None:
        return None
    import yaml

    node = yaml.safe_load(Path(source).read_text())
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _unknown_part(key: str, keys: list[str], argv: list[str]) -> tuple[str, str | None]:
    """The leading part of `key` that is unknown (`a.b.init_args.typo` of `a.b.init_args.typo.x`) and the
    closest valid key. Keys below a class-typed option are checked against that class's constructor."""
    parts = key.split(".")
    for j in range(1, len(parts) + 1):
        prefix = ".".join(parts[:j])
        if any(k == prefix or k.startswith(prefix + ".") for k in keys):
            continue
        if j >= 2 and parts[j - 2] == "init_args":
            owner = ".".join(parts[:j - 2])
            node = _config_node(owner, argv)
            params = init_parameters(node["class_path"]) if isinstance(node, dict) and node.get("class_path") else []
            if parts[j - 1] in params:
                continue
            guess = closest(parts[j - 1], params)
            return prefix, f"{owner}.init_args.{guess}" if guess else None
        if parts[j - 1] == "init_args":
            continue
        return prefix, closest(prefix, keys)
    return key, None


def _suggest(key: str, guess: str | None) -> str:
    """`; did you mean <guess>?`, or for a renamed key `; it was renamed to <new key>`."""
    if not guess:
        return ""
    if key.rsplit(".", 1)[-1] in RENAMED_KEYS:
        return f"; it was renamed to {guess}"
    return f"; did you mean {guess}?"


def _where(key: str, argv: list[str]) -> str:
    flags = {f"--{key}", f"--{key.replace('.init_args.', '.')}"}
    if any(a.split("=", 1)[0] in flags for a in argv):  # a flag wins over the config files
        return " (given on the command line)"
    source = _in_config_files(key, argv)
    return f" (set in {source})" if source else ""


def _leaf_message(kind: str, match: re.Match, path: list[str], class_path: str | None, keys: list[str],
                  argv: list[str]) -> str:
    prefix = ".".join(p for p in path if p)
    if kind == "unknown":
        valid = init_parameters(class_path) if class_path else []
        name = match.group(1)
        if name.split(".")[0] not in valid:  # `max_example.train`: the unknown part is `max_example`
            name = name.split(".")[0]
        key = f"{prefix}.{name}" if prefix else name
        guess = closest(name, valid)
        hint = _suggest(name, f"{prefix}.{guess}") if guess else (
            f"; {class_path.rsplit('.', 1)[-1]} accepts: {', '.join(valid)}" if valid else "")
        return f"unknown key {key}{_where(key, argv)}{hint}"
    if kind == "type":
        key = prefix or "value"
        return f"{key}: expected {_readable_type(match.group(1))}, got {match.group(2)!r}{_where(key, argv)}"
    if kind == "no_class":
        module, name = match.groups()
        guess = closest(name, _module_names(module))
        hint = f"; did you mean {module}.{guess}?" if guess else ""
        key = prefix.removesuffix(".init_args") or "class_path"
        return f"{key}: there is no class {module}.{name}{hint}"
    if kind == "no_file":
        return f"file not found: {match.group(1).strip()}" + (f" (for {prefix})" if prefix and prefix != "config" else "")
    if kind == "not_accepted":
        key, guess = _unknown_part(match.group(1), keys, argv)
        return f"unknown key {key}{_where(key, argv)}" + _suggest(key, guess)
    # unrecognized command-line arguments: each `--key`, with its closest valid key
    flags = [a for a in match.group(1).split() if a.startswith("--")]
    parts = []
    for flag in flags or match.group(1).split()[:1]:
        key = flag.lstrip("-").split("=", 1)[0]
        guess = closest(key, keys)
        parts.append(f"unknown option --{key}" + _suggest(key, f"--{guess}" if guess else None))
    return "; ".join(parts)


def parser_keys(parser) -> list[str]:
    """Every dotted option a (sub)parser knows, without the leading dashes."""
    out = []
    for action in getattr(parser, "_actions", []):
        out += [s.lstrip("-") for s in action.option_strings if s.startswith("--")]
    return out


def user_error_message(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for errors a user fixes (bad data, bad settings, missing files, no network),
    or None for anything else (a bug: keep the traceback)."""
    from talr.tasks.base import DataError

    if isinstance(err, DataError):
        fix = ("Fix: correct that row (or remove it) and rerun." if err.row is not None else
               "Fix: check the file or folder given as data.task.init_args.source and rerun.")
        return f"bad data: {err}\n{fix}", 1
    name = type(err).__name__
    text = str(err).strip() or name
    if name in ("MisconfigurationException", "NonFiniteError"):
        return text, 1 if name == "NonFiniteError" else 2
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or (
            isinstance(err, OSError) and ("huggingface.co" in text or "offline" in text.lower())):
        return (f"{text.splitlines()[0]}\nThis needs the Hugging Face hub (a hub model or data set id). Offline, "
                "use a local directory, a .gguf file or builtin:SmolLM2-135M-Instruct, and a local data file."), 1
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return text, 1
    return None
