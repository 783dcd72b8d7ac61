"""clipsearch: a thin client for the clipsearch gRPC service (CLIP embeddings + HNSW search).

The client needs neither torch nor Pillow; the server is the ``clipsearch[server]`` extra.
"""

from importlib.metadata import PackageNotFoundError, version

from clipsearch.analysis import Classification, Cluster, Clustering, DuplicateGroup, LabelScore
from clipsearch.client import Client
from clipsearch.errors import BatchError, ClipSearchError, ItemFailure, PartialWriteError
from clipsearch.filters import to_filter
from clipsearch.images import ImageInput
from clipsearch.results import CollectionInfo, Hit, Record, ServerInfo, TowerTuning

try:
    __version__ = version("clipsearch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BatchError",
    "Classification",
    "Client",
    "ClipSearchError",
    "Cluster",
    "Clustering",
    "CollectionInfo",
    "DuplicateGroup",
    "Hit",
    "ImageInput",
    "ItemFailure",
    "LabelScore",
    "PartialWriteError",
    "Record",
    "ServerInfo",
    "TowerTuning",
    "__version__",
    "to_filter",
]
