"""clipsearch server: CLIP embeddings and HNSW search over gRPC."""

__version__ = "0.1.0"
