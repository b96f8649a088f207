"""Where the gateway's bearer token comes from: one rule for the gateway and for its clients (the CLI).

The environment (``DRAMATURG_API_TOKEN``), else the config, else ``$DRAMATURG_HOME/api-token``,
which ``dramaturg up`` creates (mode 600) on first start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_ENV = "DRAMATURG_API_TOKEN"


def resolve_token(configured: str | None, home: Path) -> str | None:
    """The token in force: the environment, else the config file, else ``$DRAMATURG_HOME/api-token``."""
    token = os.environ.get(TOKEN_ENV) or configured
    if not token:
        path = home / "api-token"
        if path.exists():
            token = path.read_text().strip()
    return token or None


def ensure_token_file(home: Path) -> tuple[str, Path]:
    """Create ``$DRAMATURG_HOME/api-token`` (mode 600) if missing; return the token and its path."""
    path = home / "api-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return path.read_text().strip(), path
