"""datetime values in metadata: stored as ISO 8601 UTC text that time filters compare against,
so the README's filter example works on values written by the same client."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from clipsearch import Client
from clipsearch.filters import stored_time
from clipsearch.results import metadata_to_struct

UTC = dt.timezone.utc
PARIS_SUMMER = dt.timezone(dt.timedelta(hours=2))


def test_stored_form() -> None:
    assert stored_time(dt.datetime(2021, 6, 1, 12, 30, tzinfo=UTC)) == "2021-06-01T12:30:00Z"
    assert stored_time(dt.datetime(2021, 6, 1, 14, 30, tzinfo=PARIS_SUMMER)) == \
        "2021-06-01T12:30:00Z"
    assert stored_time(dt.datetime(2021, 6, 1, 0, 0, 0, 250, tzinfo=UTC)) == \
        "2021-06-01T00:00:00.000250Z"
    assert stored_time(dt.date(2021, 6, 1)) == "2021-06-01"
    struct = metadata_to_struct({"taken": dt.datetime(2020, 1, 2, tzinfo=UTC),
                                 "exif": {"times": [dt.date(2019, 5, 4)]}})
    assert struct["taken"] == "2020-01-02T00:00:00Z"
    assert list(struct["exif"]["times"]) == ["2019-05-04"]


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(TypeError, match="timezone"):
        metadata_to_struct({"taken": dt.datetime(2020, 1, 1)})


def test_readme_time_filter_matches_datetimes_written_by_the_client(client: Client) -> None:
    dim = client.info().dim
    taken = [
        dt.datetime(2019, 12, 31, 23, 59, 59, tzinfo=UTC),
        dt.datetime(2020, 1, 1, 1, 0, tzinfo=PARIS_SUMMER),   # 2019-12-31T23:00Z: before
        dt.datetime(2020, 1, 1, tzinfo=UTC),                   # exactly the bound
        dt.datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        dt.datetime(2024, 7, 14, 9, 30, tzinfo=PARIS_SUMMER),
    ]
    ids = [f"t{i}" for i in range(len(taken))]
    vectors = np.random.default_rng(3).normal(size=(len(ids), dim)).astype(np.float32)
    client.upsert("times", ids=ids, vectors=vectors,
                  metadata=[{"taken": t, "album": "2024"} for t in taken])
    since_2020 = {"taken": {"$gte": dt.datetime(2020, 1, 1, tzinfo=UTC)}}
    assert client.count("times", filter=since_2020) == 3
    hits = client.search("times", vector=vectors[0], k=10,
                         filter={"album": {"$in": ["2023", "2024"]}, **since_2020})
    assert sorted(h.id for h in hits) == ["t2", "t3", "t4"]
    before = {"taken": {"$lt": dt.datetime(2020, 1, 1, tzinfo=UTC)}}
    assert client.count("times", filter=before) == 2
    assert client.get("times", ["t4"])[0].metadata["taken"] == "2024-07-14T07:30:00Z"
