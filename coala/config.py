"""Command-line flags merged with YAML configs.

Every YAML key has the same name as a command-line flag (without the leading
dashes). Values are applied in this order, later ones winning: the parser's
defaults, the YAML file given with ``--config``, the flags typed on the command
line. Unknown YAML keys are an error, so a typo in a config never silently
falls back to a default.

A config may be flat (keys of one script) or split into sections, one per
script, so one file describes a whole (model, dataset) setting::

    model_shape: {num_layers: 30, hidden_size: 576, num_parameters: 134515008}
    extract: {pool: attn, max_length: 512}
    cronos: {num_patterns: 10, beta: 0.001}
    finetune: {epochs: 500, learning_rate: 0.0001}

A script reads only its own section; the other sections are ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml


SECTIONS = ("model_shape", "extract", "cronos", "finetune", "eval", "sft", "dpo", "orpo")


class ConfigError(ValueError):
    """A YAML config that cannot be used: missing, unparsable, or with unknown keys."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Add the ``--config FILE.yaml`` flag to ``parser``."""
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file whose keys are flag names; flags given on the command line override it.",
    )


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; raise ``ConfigError`` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Pass an existing YAML file to --config.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"Config file {path} must contain a mapping of flag names to values, got {type(content).__name__}.")
    return content


def select_section(values: dict[str, Any], section: str | None, path: str | Path) -> dict[str, Any]:
    """Return the mapping for ``section`` from a sectioned config, or ``values`` itself when flat."""
    sectioned = any(key in SECTIONS and isinstance(value, dict) for key, value in values.items())
    if not sectioned:
        return values
    if section is None:
        raise ConfigError(f"Config file {path} is split into sections {sorted(values)}; this script reads flat configs only.")
    chosen = values.get(section, {}) or {}
    if not isinstance(chosen, dict):
        raise ConfigError(f"Section '{section}' of config file {path} must be a mapping, got {type(chosen).__name__}.")
    return chosen


def parse_args_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    section: str | None = None,
    ignored_keys: Sequence[str] = (),
) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults taken from ``--config`` when given.

    Args:
      parser: a parser that has the ``--config`` flag (see ``add_config_flag``).
      argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.
      section: the section of a sectioned config this script reads
        (one of ``SECTIONS``, e.g. ``"extract"``).
      ignored_keys: keys that are skipped instead of being rejected.

    Returns:
      The parsed namespace. ``namespace.config`` holds the YAML path or ``None``.
    """
    first_pass, _ = parser.parse_known_args(argv)
    config_path = getattr(first_pass, "config", None)
    if config_path:
        values = select_section(load_yaml_config(config_path), section, config_path)
        known = {action.dest: action for action in parser._actions if action.dest != "help"}
        unknown = sorted(key for key in values if key not in known and key not in ignored_keys)
        if unknown:
            raise ConfigError(
                f"Config file {config_path} has unknown keys {unknown}; "
                f"valid keys are the flag names of this script: {sorted(known)}."
            )
        parser.set_defaults(**{
            key: convert_config_value(known[key], value, config_path) for key, value in values.items() if key in known
        })
    return parser.parse_args(argv)


def convert_config_value(action: argparse.Action, value: Any, config_path: str) -> Any:
    """Convert a YAML value with the flag's own ``type``, as argparse converts a command-line string.

    argparse applies ``type`` only to strings, so without this a YAML ``5.0`` for an
    integer flag or ``null`` for a float flag would reach the solver unchecked.
    Raises ``ConfigError`` naming the key and the value when the conversion fails.
    """
    if action.type is None:
        return value
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"Config file {config_path}: {action.dest}=null is invalid; give a value or remove the key.")
    if isinstance(value, list):
        if action.nargs in (None, "?"):
            raise ConfigError(f"Config file {config_path}: {action.dest}={value!r} is invalid; it takes one value, not a list.")
        return [convert_scalar(action, item, config_path) for item in value]
    return convert_scalar(action, value, config_path)


def convert_scalar(action: argparse.Action, value: Any, config_path: str) -> Any:
    """Convert one YAML scalar with ``action.type``; raise ``ConfigError`` for booleans, mappings and bad values."""
    type_name = getattr(action.type, "__name__", "value")
    if isinstance(value, (bool, dict, list)) or value is None:
        raise ConfigError(f"Config file {config_path}: {action.dest}={value!r} is invalid; it takes a {type_name}.")
    try:
        return action.type(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(
            f"Config file {config_path}: {action.dest}={value!r} is invalid; it takes a {type_name} ({error})."
        ) from error


def namespace_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Return the parsed settings as a JSON-friendly dict (paths become strings)."""
    result: dict[str, Any] = {}
    for key, value in vars(args).items():
        result[key] = str(value) if isinstance(value, Path) else value
    return result
