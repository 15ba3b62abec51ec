"""Container health check: exit 0 when mirrorgate answers GET /v2/health/ready with 200.

Run by the image's HEALTHCHECK with the image's own interpreter, so it needs nothing
beyond the standard library (the slim image has no curl). The port is the one the server
listens on: ``MIRRORGATE_SERVER__PORT`` when set (the same override the server reads),
else 8080, the image config's port. ``MIRRORGATE_HEALTHCHECK_URL`` replaces the whole URL,
for a config file that moves the server elsewhere.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready_url(env: dict[str, str]) -> str:
    explicit = env.get("MIRRORGATE_HEALTHCHECK_URL")
    if explicit:
        return explicit
    port = env.get("MIRRORGATE_SERVER__PORT", "8080")
    return f"http://127.0.0.1:{port}/v2/health/ready"


def main() -> int:
    url = ready_url(dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
