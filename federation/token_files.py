"""Token files: `tokens.write_file`, `read_file` and `peer_file` read into the tokens they hold;
`fleet_secret_file` checked by the same rules (its secret is read by the node, never kept in
the config, so nothing that prints a config can print it).

Files keep secrets out of `ps` and out of config files; `load_config` calls this after every
source is applied, so a file's tokens join those given inline.
"""

from __future__ import annotations

import os
from typing import Any

from loraflight.errors import ConfigError

from .fleet_auth import FleetSecret
from .security import load_tokens


def add_token_files(cfg: Any, problems: list[str]) -> None:
    """Read tokens.*_file into tokens.write / read / peer (a file that cannot be read is a problem)."""
    t = cfg.tokens
    for kind in ("write", "read", "peer"):
        path = getattr(t, f"{kind}_file")
        if not path:
            continue
        try:
            toks = load_tokens(os.path.expanduser(path))
        except (ConfigError, OSError) as e:
            problems.append(f"tokens.{kind}_file: {e}")
            continue
        if kind == "peer":
            t.peer = t.peer or toks[0]
        else:
            have = getattr(t, kind)
            have.extend(x for x in toks if x not in have)
    if cfg.fleet_secret_file:
        try:
            read_fleet_secret(cfg.fleet_secret_file)
        except (ConfigError, OSError) as e:
            problems.append(f"fleet_secret_file: {e}")


def read_fleet_secret(path: str) -> FleetSecret | None:
    """The fleet secret in `path` (None for an empty path); ConfigError saying what is wrong."""
    if not path:
        return None
    return FleetSecret.from_file(os.path.expanduser(path))


__all__ = ["add_token_files", "read_fleet_secret"]
