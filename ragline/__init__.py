"""ragline: a RAG serving pipeline split into independently scalable gRPC stages."""

__version__ = "0.1.0"
