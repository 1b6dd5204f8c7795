"""Defaults from a TOML file, so a setting is written once instead of on every command.

The file is $RAGCAP_CONFIG, else config.toml in the store's home ($RAGCAP_HOME or the user data
directory); it is optional. For each setting the first of these wins: the command-line flag, its
environment variable, the file, the built-in default:

    model = "/models/clip-vit-b32"       # RAGCAP_MODEL: the embedder of new collections
    qdrant_url = "http://qdrant:6333"    # RAGCAP_QDRANT_URL: a server instead of the embedded store
    qdrant_api_key = "..."               # RAGCAP_QDRANT_API_KEY
    device = "cuda:1"                    # RAGCAP_DEVICE: where models run
    precision = "bf16"                   # RAGCAP_PRECISION: fp32, bf16, fp16 or int8 (ragcap.precision)

A malformed file or an unknown key is an error naming the file and the line, from any command
that reads a setting. The file is read each time a setting is asked for: a few small reads per
command, and an edit takes effect at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from ragcap.errors import ConfigError

CONFIG_ENV = "RAGCAP_CONFIG"
CONFIG_NAME = "config.toml"
# Each key of the file and the environment variable that overrides it.
ENV_OF = {
    "model": "RAGCAP_MODEL",
    "qdrant_url": "RAGCAP_QDRANT_URL",
    "qdrant_api_key": "RAGCAP_QDRANT_API_KEY",
    "device": "RAGCAP_DEVICE",
    "precision": "RAGCAP_PRECISION",
}


def config_path() -> Path:
    """The config file in effect (it need not exist unless $RAGCAP_CONFIG names it)."""
    from ragcap.store import default_home

    named = os.environ.get(CONFIG_ENV, "").strip()
    return Path(named).expanduser() if named else default_home() / CONFIG_NAME


def file_settings() -> dict[str, str]:
    """The settings the config file holds ({} without a file); ConfigError if it is malformed."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV, "").strip():
            raise ConfigError(f"{CONFIG_ENV} names {path}, which does not exist; create it or unset {CONFIG_ENV}") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from None
    return _parse(path, text)


def setting(key: str) -> tuple[str | None, str]:
    """(value, where it came from: the variable's name, the file's path, or "built-in") for a key
    of ENV_OF; a command-line flag, when given, wins over all of these and is the caller's."""
    env = ENV_OF[key]
    if os.environ.get(env, "").strip():
        return os.environ[env].strip(), env
    value = file_settings().get(key)
    return (value, str(config_path())) if value is not None else (None, "built-in")


def _parse(path: Path, text: str) -> dict[str, str]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key, value in data.items():
        where = f"{path}: line {_line_of(text, key)}"
        if key not in ENV_OF:
            raise ConfigError(f"{where}: unknown key '{key}'; the keys are {', '.join(ENV_OF)}")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f'{where}: {key} must be a non-empty string, e.g. {key} = "..."')
    return {key: value.strip() for key, value in data.items()}


def _line_of(text: str, key: str) -> int | str:
    """The line defining a top-level key or table (tomllib reports positions only for syntax errors)."""
    match = re.search(rf'^[ \t]*(\[[ \t]*)?["\']?{re.escape(key)}["\']?\s*[=\].]', text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else "?"
