"""clipsearch server: CLIP embeddings and HNSW search over gRPC."""

import os

__version__ = "0.1.0"

# The index forks a child to write snapshots (stores/local/snapshot_child.py); the child never
# calls gRPC, so gRPC's own fork handlers are not needed, and they are not safe while other
# threads are in gRPC.
# Read when gRPC initialises: this works where the server is imported first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
