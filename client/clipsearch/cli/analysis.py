"""The commands beyond search: recommend, classify, duplicates and cluster."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipsearch.cli.options import add_collection_option, positive_int
from clipsearch.cli.search import print_hits
from clipsearch.client import Client
from clipsearch.errors import BatchError


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    recommend = commands.add_parser(
        "recommend", parents=[parent], help="items like some examples and unlike others")
    add_collection_option(recommend, "collection to recommend from", checked=False)
    recommend.add_argument("--like", action="append", default=[], metavar="ID",
                           help="a stored item to find more like (repeatable)")
    recommend.add_argument("--unlike", action="append", default=[], metavar="ID",
                           help="a stored item to steer away from (repeatable)")
    recommend.add_argument("--like-text", action="append", default=[], metavar="TEXT",
                           help="a text to find items like (repeatable)")
    recommend.add_argument("--unlike-text", action="append", default=[], metavar="TEXT",
                           help="a text to steer away from (repeatable)")
    recommend.add_argument("--like-image", action="append", default=[], metavar="PATH",
                           help="an image file to find items like (repeatable)")
    recommend.add_argument("--unlike-image", action="append", default=[], metavar="PATH",
                           help="an image file to steer away from (repeatable)")
    recommend.add_argument("-k", type=positive_int, default=10, help="hits wanted (default 10)")
    recommend.add_argument("--strategy", choices=["average-vector", "best-score"],
                           default="average-vector",
                           help="how examples combine (default: average-vector)")
    recommend.set_defaults(run=_recommend)

    classify = commands.add_parser("classify", parents=[parent],
                                   help="zero-shot classify images by labels")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    classify.add_argument("--labels", required=True, metavar="A,B,C",
                          help="comma-separated labels in plain words")
    classify.add_argument("--template", action="append", default=None, metavar="TEXT",
                          help='prompt with {} for the label (repeatable; default '
                               '"a photo of a {}.")')
    classify.add_argument("--top", type=positive_int, default=3, metavar="N",
                          help="labels shown per image (default 3)")
    classify.set_defaults(run=_classify)

    duplicates = commands.add_parser("duplicates", parents=[parent],
                                     help="groups of near-duplicate items")
    add_collection_option(duplicates, "collection to search for duplicates", checked=False)
    duplicates.add_argument("--threshold", type=_threshold, default=None,
                            help="cosine similarity, (0, 1] (default: the server's, 0.95)")
    duplicates.add_argument("--neighbors", type=positive_int, default=10, metavar="N",
                            help="graph neighbours looked at per item (default 10)")
    duplicates.set_defaults(run=_duplicates)

    cluster = commands.add_parser("cluster", parents=[parent],
                                  help="k-means groups of a collection")
    add_collection_option(cluster, "collection to cluster", checked=False)
    cluster.add_argument("-n", "--clusters", type=positive_int, required=True, metavar="N",
                         help="number of clusters")
    cluster.add_argument("--top", type=positive_int, default=5, metavar="N",
                         help="central items shown per cluster (default 5)")
    cluster.add_argument("--seed", type=int, default=0,
                         help="k-means seed: the same seed gives the same clusters")
    cluster.add_argument("--write-key", metavar="KEY", default=None,
                         help="store each item's cluster number under this metadata key")
    cluster.set_defaults(run=_cluster)


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _recommend(client: Client, args: argparse.Namespace) -> int:
    positives = [*args.like, *({"text": t} for t in args.like_text),
                 *({"image": p} for p in args.like_image)]
    negatives = [*args.unlike, *({"text": t} for t in args.unlike_text),
                 *({"image": p} for p in args.unlike_image)]
    hits = client.recommend(args.collection, positives, negatives, k=args.k,
                            strategy=args.strategy.replace("-", "_"))
    print_hits(hits)
    return 0


def _classify(client: Client, args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    status = 0
    try:
        results: list[Any] = client.classify(args.images, labels, templates=args.template,
                                             top_n=args.top)
    except BatchError as exc:
        results = exc.results  # type: ignore[attr-defined]
        for error in exc.errors:
            print(f"failed: {args.images[error.index]}: {error.code.name}: {error.message}",
                  file=sys.stderr)
        status = 1
    for path, result in zip(args.images, results, strict=True):
        if result is None:
            continue
        print(path)
        for score in result.top:
            print(f"  {score.probability:.4f}  {score.label}")
    return status


def _duplicates(client: Client, args: argparse.Namespace) -> int:
    groups = 0
    for groups, group in enumerate(client.iter_duplicates(
            args.collection, threshold=args.threshold, neighbors=args.neighbors), 1):
        print(f"group {groups}: {len(group.members)} items, lowest similarity "
              f"{group.min_similarity:.4f}")
        for id_, score in group.members:
            print(f"  {score:.4f}  {id_}")
    if groups == 0:
        print("no duplicates")
    return 0


def _cluster(client: Client, args: argparse.Namespace) -> int:
    result = client.cluster(args.collection, args.clusters, top_n=args.top, seed=args.seed,
                            metadata_key=args.write_key)
    for c in result.clusters:
        print(f"cluster {c.cluster}: {c.size} items; most central:")
        for hit in c.central:
            meta = json.dumps(hit.metadata, separators=(",", ":"), ensure_ascii=False)
            print(f"  {hit.score:.4f}  {hit.id}  {meta}")
    if args.write_key:
        print(f"wrote metadata key {args.write_key!r} on {result.items_labelled} items")
    return 0
