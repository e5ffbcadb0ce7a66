"""The HTTP search service (`mmretrieve serve`): FastAPI on uvicorn.

    app.py         routes, error shapes, request metrics
    engine.py      the model and indexes on one worker thread; dynamic batching; reloads
    files.py       which files may be served, and opening them safely
    uploads.py     size-limited upload reading and checked decoding
    thumbnails.py  thumbnails made with Pillow and cached on disk
    metrics.py     Prometheus text exposition
    auth.py        the optional API key
    static/        the search page

Importing this package imports nothing heavy; ``create_app`` and ``serve`` do.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(config: ServeConfig):
    from .app import create_app as build

    return build(config)


def serve(config: ServeConfig, **options) -> None:
    from .server import serve as run

    run(config, **options)
