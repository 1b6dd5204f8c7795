"""ragcap: retrieval-augmented image captioning with a Qdrant caption memory.

Data flow, one module per stage:
    pipelines/ (source) -> ragcap.embed -> ragcap.store -> ragcap.retrieve -> ragcap.decoders (decode)
"""

__version__ = "0.1.0"
