"""`ragcap serve`: captioning over HTTP (a versioned JSON API and a web page) with dynamic batching.

    from ragcap import CaptionSettings, ServeConfig, create_app, load_captioner, open_store
    store = open_store()
    app = create_app(load_captioner(store, "coco", CaptionSettings(modes=("pd",)), decoder="decoders/coco",
                                    image_only=False), ServeConfig())
    # run `app` with any ASGI server, e.g. uvicorn.run(app)

Modules: config (limits and batching), batching (the dynamic batcher), service (the loaded
resources and the operations requests may ask for), routes (/v1), app (the ASGI app, the page,
/metrics), errors (JSON error answers), server (uvicorn, graceful stop). Names are imported on
first use, so the CLI can read ServeConfig's defaults without importing the web stack.
"""

from importlib import import_module

_EXPORTS = {"ServeConfig": "ragcap.serve.config", "create_app": "ragcap.serve.app", "serve": "ragcap.serve.server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ragcap.serve' has no attribute {name!r}")
