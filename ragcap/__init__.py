"""ragcap: retrieval-augmented image captioning with a Qdrant caption memory.

Data flow, one module per stage:
    pipelines/ (source) -> ragcap.embed -> ragcap.store -> ragcap.retrieve -> ragcap.decoders (decode)

The public API, the layer the CLI and the server are both written on:

    from ragcap import CaptionSettings, load_captioner, open_store
    with open_store() as store:
        captioner = load_captioner(store, "coco", CaptionSettings(modes=("pd", "clipre")), decoder="decoders/coco")
        for result in captioner.caption_images(["photo.jpg"]):  # paths, encoded bytes or PIL images
            print(result.source, result.mode, result.caption)

Names are imported on first use, so `import ragcap` (and the CLI's option parsing) stays free
of torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "open_store": "ragcap.store",
    "Hit": "ragcap.store",
    "ingest_corpus": "ragcap.api",
    "load_captioner": "ragcap.api",
    "search": "ragcap.api",
    "SearchResult": "ragcap.api",
    "training_data": "ragcap.api",
    "export_collection": "ragcap.api",
    "IngestOptions": "ragcap.api",
    "CaptionSettings": "ragcap.caption",
    "CaptionResult": "ragcap.caption",
    "Captioner": "ragcap.caption",
    "SearchOptions": "ragcap.generation",
    "load_image": "ragcap.images",
    "ImageTooLarge": "ragcap.images",
    "RagcapError": "ragcap.errors",
    "ImageError": "ragcap.errors",
    "ServeConfig": "ragcap.serve",
    "create_app": "ragcap.serve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ragcap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
