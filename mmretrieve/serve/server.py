"""Running the app under uvicorn: one process, one event loop, the engine's worker thread beside it."""

from __future__ import annotations

import ipaddress
import logging

from .config import ServeConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, root_path: str = "",
          log_level: str = "info") -> None:
    """Load everything, then answer HTTP until interrupted (Ctrl-C / SIGTERM finish in-flight requests)."""
    import uvicorn

    from .app import create_app

    app = create_app(config)  # a missing index or model fails here, before the port opens
    if not config.api_key and not is_loopback(host):
        log.warning("listening on %s without an API key: anyone who can reach it can search and read the "
                    "indexed images (set MMRETRIEVE_API_KEY)", host)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level=log_level, proxy_headers=True,
                server_header=False, timeout_graceful_shutdown=10)
