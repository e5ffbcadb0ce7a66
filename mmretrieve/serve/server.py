"""Running the app under uvicorn: one process, one event loop, the engine's worker thread beside it."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, Callable

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
          log_level: str = "info", on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Load everything, then answer HTTP until interrupted (Ctrl-C / SIGTERM finish in-flight requests).

    ``on_ready`` is called once the port is listening with what ``ready_info`` describes (the
    CLI's `serve --json` prints it); with it, uvicorn's access log goes to stderr, so stdout
    carries nothing else.
    """
    import copy

    import uvicorn

    from .app import create_app

    app = create_app(config)  # a missing index or model fails here, before the port opens
    if not config.api_key and not is_loopback(host):
        log.warning("listening on %s without an API key: anyone who can reach it can search and read the "
                    "indexed images (set MMRETRIEVE_API_KEY)", host)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if on_ready is not None:
        log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    options = uvicorn.Config(app, host=host, port=port, root_path=root_path, log_level=log_level,
                             log_config=log_config, proxy_headers=True, server_header=False,
                             timeout_graceful_shutdown=10)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if on_ready is not None and self.started and not self.should_exit:
                bound = [sock.getsockname() for server in self.servers for sock in (server.sockets or ())]
                on_ready(ready_info(app, host, bound[0][1] if bound else port, root_path))

    server = Server(options)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # uvicorn has logged why (e.g. the port is in use), as uvicorn.run would
        raise SystemExit(3)


def ready_info(app, host: str, port: int, root_path: str = "") -> dict[str, Any]:
    """What a script needs once the server listens: where, what it serves, and which process."""
    engine = app.state.engine
    shown = f"[{host}]" if ":" in host else host
    return {"url": f"http://{shown}:{port}{root_path}", "host": host, "port": port, "pid": os.getpid(),
            "model": {"ref": engine.embedder.ref, "fingerprint": engine.embedder.fingerprint,
                      "embed_dim": int(engine.embedder.embed_dim)},
            "runtime": engine.embedder.runtime,
            "indexes": {name: {"folder": str(Path(status["folder"]).resolve()), "generation": status["generation"],
                               "items": status["items"], "index_type": status["index_type"]}
                        for name, status in engine.status.items()}}
