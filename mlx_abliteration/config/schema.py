"""One schema for every way settings arrive: command-line flags, ``--config`` files, the GUI, the library.

The schema *is* the argparse definition of ``mlx-abliterate run`` (type, choices,
store_true flags, nargs lists), so a config file's value is checked by the same
rules and fails with the same message as the flag would: ``overwrite: "false"``
is an error, not true; ``targets: o_proj`` is an error, not five one-letter
names. Values that arrive as typed data (YAML/TOML numbers, GUI widgets) must
have the flag's type; strings are converted exactly as the command line
converts them.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from functools import lru_cache

from mlx_abliteration.config.defaults import AbliterationConfig, load_config_file
from mlx_abliteration.config.flags import add_config_arguments
from mlx_abliteration.errors import UserError

NON_CONFIG = {"quiet", "json", "log_file", "config_file", "command", "_command"}


def build_config(values: dict, base: AbliterationConfig | None = None) -> AbliterationConfig:
    """``base`` (default: the defaults) with ``values`` applied, each checked as its flag would be.

    The one place a config is built from outside values: command-line flags, config files, the GUI's
    form, a recorded log, library calls."""
    base = base or AbliterationConfig()
    known = {f.name for f in fields(base)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}")
    return AbliterationConfig(**{**base.to_dict(), **check_settings(values)})


def config_from_args(args: argparse.Namespace, base: AbliterationConfig | None = None) -> AbliterationConfig:
    """defaults <- --config file <- flags the user typed."""
    config = base or AbliterationConfig()
    if getattr(args, "config_file", None):
        try:
            config = build_config(load_config_file(args.config_file), config)
        except UserError as err:
            raise UserError(f"config file {args.config_file}: {err}") from None
    typed = {k: v for k, v in vars(args).items() if k not in NON_CONFIG and not k.startswith("_")}
    known = set(config.to_dict())
    # None: a command's own flag that was not given (e.g. ablate's --use-layer), not a setting.
    return build_config({k: v for k, v in typed.items() if k in known and v is not None}, config)


@lru_cache(maxsize=1)
def _actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    return {a.dest: a for a in parser._actions if a.option_strings}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _optional_fields() -> set[str]:
    return {f.name for f in fields(AbliterationConfig) if f.default is None}


def check_setting(name: str, value):
    """``value`` checked (and, for strings of number flags, converted) as flag ``name`` would be."""
    action = _actions().get(name)
    if action is None:
        return value
    flag = _flag(action)
    if value is None:
        if name in _optional_fields():
            return None
        raise UserError(f"argument {flag}: needs a value, got null")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"argument {flag}: expects true or false, got {_describe(value)}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(
                f"argument {flag}: expects a list of names such as [o_proj, down_proj], got {_describe(value)}"
            )
        return [_convert(action, v) for v in value]
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        raise UserError(f"argument {flag}: expects {_kind(action)}, got {_describe(value)}")
    if action.type is int and isinstance(value, float):
        raise UserError(f"argument {flag}: invalid int value: {value!r}")
    if action.type is not None and isinstance(value, (int, float)):
        value = action.type(value) if action.type is int else float(value)
    elif action.type is None and isinstance(value, (int, float)):
        value = str(value)  # e.g. use_layer: 12 or layers: 10, as typed on the command line
    else:
        value = _convert(action, value)
    if action.choices is not None and value not in action.choices:
        _check(action, value)
    return value


def check_settings(values: dict) -> dict:
    return {name: check_setting(name, value) for name, value in values.items()}


def _convert(action: argparse.Action, text: str):
    """``text`` through the flag's own conversion and choices; argparse's message on failure."""
    parser = argparse.ArgumentParser(add_help=False)
    try:
        value = parser._get_value(action, text)
        parser._check_value(action, value)
    except argparse.ArgumentError as err:
        raise UserError(str(err)) from None
    return value


def _check(action: argparse.Action, value) -> None:
    try:
        argparse.ArgumentParser(add_help=False)._check_value(action, value)
    except argparse.ArgumentError as err:
        raise UserError(str(err)) from None


def _kind(action: argparse.Action) -> str:
    if action.type is int:
        return "an integer"
    if action.type is not None:
        return "a number"
    return "a string"


def _describe(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return f"{value!r} (a {type(value).__name__})"
