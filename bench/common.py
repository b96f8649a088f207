"""What every bench does the same way: start a service in its own process, write its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def serve(service: str, home: Path, port: int, config: Path | None = None,
          timeout: float = 180.0) -> subprocess.Popen:
    """``dramaturg serve SERVICE`` on ``port`` with ``home`` as DRAMATURG_HOME, once it is SERVING."""
    from dramaturg.shared.grpc.client import wait_for_serving

    env = {**os.environ, "DRAMATURG_HOME": str(home)}
    cmd = [sys.executable, "-m", "dramaturg.shared.cli.main", "serve", service, "--port", str(port),
           "--metrics-port", "0"]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    if not wait_for_serving(f"127.0.0.1:{port}", timeout=timeout):
        proc.kill()
        raise RuntimeError(f"the {service} service did not start")
    return proc


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """The bench's figures as JSON at ``out`` (a path, or a file name under bench/results)."""
    path = Path(out)
    if not path.parent.parts:
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")
    return path
