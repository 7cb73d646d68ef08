"""The prediction log's compaction (readmission.log_compaction) in a real SeaweedFS: a finished
day's parts become one object, every logged row stays readable exactly once whatever point a
compaction stops at, and the outcomes join reads the same rows before and after."""

from __future__ import annotations

import datetime as dt
import io
import itertools

import pandas as pd
import pyarrow.parquet as pq
import pytest
from support.log_parts import ship_parts
from support.seaweed_server import SeaweedServer, seaweed_s3

from readmission import log_compaction
from readmission.config import Buckets, Settings
from readmission.log_compaction import (
    DOCUMENT_NAME,
    CompactionReport,
    compact_day,
    compact_log,
    list_days,
)
from readmission.outcomes import _read_day, process_outcomes, read_log
from readmission.storage import ObjectStore

TODAY = dt.date(2026, 12, 4)
OLD, OLDER = "2026-11-20", "2026-11-19"  # finished days
YESTERDAY = "2026-12-03"  # within settle_days of TODAY: left alone
_BUCKETS = itertools.count()


__all__ = ["seaweed_s3"]  # the module-scoped server fixture


@pytest.fixture
def store(seaweed_s3: SeaweedServer) -> ObjectStore:
    return ObjectStore(seaweed_s3.client())


@pytest.fixture
def bucket(store: ObjectStore) -> str:
    name = f"log-{next(_BUCKETS)}"
    store.ensure_buckets([name])
    return name


def test_the_store_reads_many_keys_in_order_and_deletes_more_than_a_request_holds(
    store: ObjectStore, bucket: str
) -> None:
    keys = [f"k/{i:04d}" for i in range(1001)]
    for key in keys:
        store.put_bytes(bucket, key, key.encode())
    assert store.get_many(bucket, [*keys[::-100], "k/missing"]) == [
        *(k.encode() for k in keys[::-100]),
        None,
    ]
    store.delete_keys(bucket, [*keys, "k/missing"])  # two requests; a missing key is no error
    assert store.list_keys(bucket, "k/") == []


def logged(store: ObjectStore, bucket: str) -> list[tuple[str, str]]:
    frame = read_log(store, bucket)
    return sorted(zip(frame["request_id"], frame["encounter_id"], strict=True))


def test_a_finished_days_parts_become_one_object_and_every_row_reads_the_same(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 5)
    ship_parts(store, bucket, f"2/{OLD}", 3)
    ship_parts(store, bucket, f"1/{YESTERDAY}", 4)
    ship_parts(store, bucket, f"1/{OLDER}", 1)  # one part: nothing to merge
    before = logged(store, bucket)
    assert len(before) == 2 * (5 + 3 + 4 + 1)

    report = compact_log(store, bucket, TODAY)
    assert (report.days, report.parts, report.deleted, report.left) == (2, 8, 8, 0)
    assert logged(store, bucket) == before
    for prefix in (f"1/{OLD}", f"2/{OLD}"):
        names = sorted(k.rsplit("/", 1)[1] for k in store.list_keys(bucket, prefix + "/"))
        assert len(names) == 2 and names[0].startswith("compacted-") and names[1] == DOCUMENT_NAME
    assert len(store.list_keys(bucket, f"1/{YESTERDAY}/")) == 4
    assert len(store.list_keys(bucket, f"1/{OLDER}/")) == 1

    etags = {k: store.head(bucket, k).etag for k in store.list_keys(bucket)}
    again = compact_log(store, bucket, TODAY)
    assert (again.days, again.deleted) == (0, 0)
    assert {k: store.head(bucket, k).etag for k in store.list_keys(bucket)} == etags


class _CrashAt(Exception):
    pass


class _Crashing:
    """An ObjectStore that raises at the first call of `method` (a process killed there)."""

    def __init__(self, store: ObjectStore, method: str) -> None:
        self._store, self._method = store, method

    def __getattr__(self, name: str):
        if name == self._method:

            def crash(*args, **kwargs):
                raise _CrashAt(name)

            return crash
        return getattr(self._store, name)


@pytest.mark.parametrize("crash_at", ["put_if_absent", "delete_keys"])
def test_a_compaction_cut_short_leaves_every_row_once_and_the_next_run_finishes_it(
    store: ObjectStore, bucket: str, crash_at: str
) -> None:
    """Killed before its document (an unnamed compacted object is left) or after it (the
    merged parts are left): readers see each row once, and the next run cleans up."""
    ship_parts(store, bucket, f"1/{OLD}", 4)
    before = logged(store, bucket)
    with pytest.raises(_CrashAt):
        compact_log(_Crashing(store, crash_at), bucket, TODAY)  # type: ignore[arg-type]
    keys = store.list_keys(bucket, f"1/{OLD}/")
    assert len(keys) == 4 + 1 + (crash_at == "delete_keys")  # parts, compacted object, doc
    assert logged(store, bucket) == before

    report = compact_log(store, bucket, TODAY)
    assert report.deleted == 4
    assert len(store.list_keys(bucket, f"1/{OLD}/")) == 2
    assert logged(store, bucket) == before


def test_an_unnamed_compacted_object_from_a_lost_race_is_never_read_and_is_deleted(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 3)
    before = logged(store, bucket)
    (first, *_) = store.list_keys(bucket, f"1/{OLD}/")
    loser = f"1/{OLD}/compacted-0000000000000000.parquet"  # another compactor's merge
    store.put_bytes(bucket, loser, store.get_bytes(bucket, first))
    assert logged(store, bucket) == before
    compact_log(store, bucket, TODAY)
    assert not store.exists(bucket, loser)
    assert logged(store, bucket) == before


def test_a_part_shipped_after_its_day_was_compacted_is_read_beside_it(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 3)
    compact_log(store, bucket, TODAY)
    ship_parts(store, bucket, f"1/{OLD}", 1, "host-2-ef01")  # a restarted server's spool
    late = logged(store, bucket)
    assert len(late) == 2 * 4
    compact_log(store, bucket, TODAY)  # the document stands; the late part stays readable
    assert logged(store, bucket) == late


def test_a_reader_whose_listing_a_compaction_overtook_reads_the_day_again(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 3)
    before = logged(store, bucket)
    (stale,) = list_days(store.list(bucket))  # listed: the three parts, no document
    compact_log(store, bucket, TODAY)  # deletes them
    tables = _read_day(store, bucket, stale)
    rows = pd.concat([t.to_pandas() for t in tables])
    assert sorted(zip(rows["request_id"], rows["encounter_id"], strict=True)) == before


def test_the_budget_compacts_one_day_at_least_and_leaves_the_rest_to_the_next_call(
    store: ObjectStore, bucket: str
) -> None:
    for day in (OLDER, OLD):
        ship_parts(store, bucket, f"1/{day}", 2)
    first = compact_log(store, bucket, TODAY, budget_seconds=0)
    assert (first.days, first.left) == (1, 1)
    assert store.exists(bucket, f"1/{OLDER}/{DOCUMENT_NAME}")  # oldest first
    second = compact_log(store, bucket, TODAY, budget_seconds=0)
    assert (second.days, second.left) == (1, 0)


def test_a_day_too_large_to_merge_in_memory_is_left_as_it_is(
    store: ObjectStore, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 3)
    ship_parts(store, bucket, f"1/{OLDER}", 2)  # smaller: under the limit
    sizes = {info.key: info.size for info in store.list(bucket, f"1/{OLD}/")}
    monkeypatch.setattr(log_compaction, "MAX_DAY_BYTES", sum(sizes.values()) - 1)
    report = compact_log(store, bucket, TODAY)
    assert report.days == 1 and store.list_keys(bucket, f"1/{OLD}/") == sorted(sizes)


def test_a_day_merged_in_small_steps_keeps_every_row_in_row_groups(
    store: ObjectStore, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_compaction, "FETCH_PARTS", 2)
    monkeypatch.setattr(log_compaction, "ROW_GROUP_ROWS", 3)
    ship_parts(store, bucket, f"1/{OLD}", 5)
    before = logged(store, bucket)
    compact_log(store, bucket, TODAY)
    document = store.get_json(bucket, f"1/{OLD}/{DOCUMENT_NAME}")
    merged = pq.ParquetFile(io.BytesIO(store.get_bytes(bucket, document["parquet"])))
    assert merged.metadata.num_rows == document["rows"] == 10
    assert merged.metadata.num_row_groups > 1
    assert logged(store, bucket) == before


def test_a_day_with_a_part_that_is_no_parquet_is_left_as_it_is_and_the_others_go_on(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 2)
    store.put_bytes(bucket, f"1/{OLD}/broken-000000.parquet", b"not parquet")
    ship_parts(store, bucket, f"1/{OLDER}", 2)
    listed = store.list_keys(bucket, f"1/{OLD}/")
    report = compact_log(store, bucket, TODAY)
    assert report.days == 1 and len(report.refused) == 1 and f"1/{OLD}" in report.refused[0]
    assert store.list_keys(bucket, f"1/{OLD}/") == listed
    assert store.exists(bucket, f"1/{OLDER}/{DOCUMENT_NAME}")


def test_compacting_a_listed_day_whose_parts_another_run_merged_takes_its_document(
    store: ObjectStore, bucket: str
) -> None:
    ship_parts(store, bucket, f"1/{OLD}", 3)
    (stale,) = list_days(store.list(bucket))
    compact_log(store, bucket, TODAY)
    report = CompactionReport()
    compact_day(store, bucket, stale, report)  # a part is gone: the winner's document decides
    assert report.days == 0
    assert len(store.list_keys(bucket, f"1/{OLD}/")) == 2


def test_the_outcomes_join_compacts_finished_days_and_matches_the_same_rows(
    seaweed_s3: SeaweedServer, store: ObjectStore
) -> None:
    name = f"join-{next(_BUCKETS)}"
    buckets = Buckets(models=f"{name}-models", predictions_log=f"{name}-log", outcomes=f"{name}-o")
    store.ensure_buckets([buckets.models, buckets.predictions_log, buckets.outcomes])
    settings = Settings(s3_endpoint_url=seaweed_s3.endpoint_url, buckets=buckets)
    ship_parts(store, buckets.predictions_log, f"1/{OLD}", 6)
    rows = logged(store, buckets.predictions_log)
    lines = ["request_id,encounter_id,readmitted"]
    lines += [f"{request},,NO" for request, _ in rows[:5]]
    lines += [f",{encounter},<30" for _, encounter in rows[5:]]
    store.put_bytes(buckets.outcomes, "o.csv", ("\n".join(lines) + "\n").encode())
    realized = process_outcomes(store, settings, buckets.outcomes, "o.csv")
    assert realized.document["matched"] == len(rows) and realized.document["unmatched"] == 0
    assert store.exists(buckets.predictions_log, f"1/{OLD}/{DOCUMENT_NAME}")
    assert logged(store, buckets.predictions_log) == rows
