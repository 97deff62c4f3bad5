"""`--config FILE`: every option of a command can also come from a TOML file.

A key is the option's long name without the dashes (`idle-timeout = 30`, or
`idle_timeout`); a flag takes `true`/`false`; an option that may be repeated takes a list.
The file's values become command-line tokens placed before the ones typed, so argparse
checks them exactly as it checks typed options (same types, same choices, same messages)
and a typed option overrides the file's. The file is read with the standard library's
`tomllib`; nothing in it is executed.
"""
from __future__ import annotations

import argparse
import tomllib
from typing import Any, Dict, List

from .common import UsageError


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """The options a file may set: every long option except --help and --config."""
    found: Dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse offers no public list of a parser's options
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs[0] in ("--help", "--config"):
            continue
        found[longs[0][2:]] = action
    return found


def _scalar(path: str, key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"{path}: {key} must be a string or a number, not {type(value).__name__}")
    return str(value)


def tokens(parser: argparse.ArgumentParser, path: str) -> List[str]:
    """The command-line tokens that `path` stands for, for the command `parser` parses.

    Raises UsageError (one line naming the file and the key) for an unreadable file, bad
    TOML, an unknown key or a value of the wrong kind."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    options = _options(parser)
    out: List[str] = []
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        action = options.get(key)
        if action is None:
            known = ", ".join(sorted(options))
            raise UsageError(f"{path}: unknown key {raw_key!r} (known: {known})")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else f"--{key}"
        if isinstance(action, argparse._CountAction):  # -v / -q: how many times
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{path}: {key} takes a count (0, 1, 2, ...)")
            out += [flag] * value
            continue
        if action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise UsageError(f"{path}: {key} takes true or false")
            if value == isinstance(action, argparse._StoreTrueAction):
                out.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise UsageError(f"{path}: {key} takes one value, not a list")
        for item in values:
            out += [flag, _scalar(path, key, item)]
    return out


def commands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """The parser of each command of a parser built with subparsers."""
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def expand(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """argv with its `--config FILE` (if any) replaced by the file's tokens, placed right
    after the command name so that what is typed wins. The result no longer names the file:
    a worker process started with it sees each option once."""
    # Found by hand, not by argparse: options the file supplies may be required ones.
    table = commands(parser)
    command = next((t for t in argv if t in table), None)
    path = None
    rest: List[str] = []
    tokens_left = iter(argv)
    for token in tokens_left:
        if token == "--config":
            path = next(tokens_left, None)
            if path is None:
                raise UsageError("--config needs a FILE")
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
    if path is None or command is None:
        return argv
    at = rest.index(command) + 1
    return rest[:at] + tokens(table[command], path) + rest[at:]
