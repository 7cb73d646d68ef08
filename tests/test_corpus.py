"""One growing corpus: deduplication, conflicts, versions, and drops appended on real SeaweedFS."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from support.seaweed_server import SeaweedServer, real_csv_bytes, sample_csv, seaweed_s3

from readmission import contract, corpus, ingest, jobs, keys
from readmission.config import Buckets, Settings
from readmission.storage import ObjectStore

__all__ = ["seaweed_s3"]

_bucket_sets = itertools.count()


def lines_of(data: bytes) -> tuple[bytes, list[bytes]]:
    header, *rows = [line for line in data.split(b"\r\n") if line]
    return header, rows


def csv_of(header: bytes, rows: list[bytes]) -> bytes:
    return b"\r\n".join([header, *rows]) + b"\r\n"


def relabelled(row: bytes) -> bytes:
    """The row with another readmitted value."""
    values, label = row.rsplit(b",", 1)
    return values + b"," + (b">30" if label == b"NO" else b"NO")


def table_of(data: bytes) -> pa.Table:
    return contract.parse_csv_table(data)


# --------------------------------------------------------------------------- pure functions


def test_row_hashes_see_content_not_layout() -> None:
    header, rows = lines_of(sample_csv(every=200))
    table = table_of(csv_of(header, rows))
    hashes = corpus.row_hashes(table)
    assert len(np.unique(hashes)) == len(rows)
    # the same rows in another order and with other quoting hash the same
    reordered = table_of(csv_of(header, rows[::-1]))
    assert sorted(corpus.row_hashes(reordered).tolist()) == sorted(hashes.tolist())
    quoted = csv_of(header, [rows[0].replace(b",Caucasian,", b',"Caucasian",'), *rows[1:]])
    assert np.array_equal(corpus.row_hashes(table_of(quoted)), hashes)
    # one changed value changes that row's hash only
    changed = csv_of(header, [relabelled(rows[0])])
    assert corpus.row_hashes(table_of(changed))[0] != hashes[0]


def test_the_schedule_keeps_single_batch_steps_for_the_real_file_then_doubles() -> None:
    assert corpus.set_sizes(5, [], 6, 2.0) == [1, 2, 3, 4, 5]  # the real file: 5 sets
    assert corpus.set_sizes(48, [], 6, 2.0) == [1, 2, 3, 4, 5, 6, 12, 24, 48]
    assert corpus.set_sizes(50, [], 6, 2.0) == [1, 2, 3, 4, 5, 6, 12, 24, 48, 50]
    assert corpus.set_sizes(50, [], 100, 2.0) == list(range(1, 51))  # linear throughout


def test_a_later_version_keeps_its_parents_sets_and_continues_the_schedule() -> None:
    parent = corpus.set_sizes(5, [], 6, 2.0)
    child = corpus.set_sizes(30, parent, 6, 2.0)
    assert child[: len(parent)] == parent and child == [1, 2, 3, 4, 5, 6, 12, 24, 30]
    assert corpus.set_sizes(5, parent, 6, 2.0) == parent  # no new batch: no new set


def test_ten_times_the_batches_fits_at_most_twelve_times_the_rows() -> None:
    for batches in (5, 8, 12):
        work = sum(corpus.set_sizes(batches, [], 6, 2.0))
        assert sum(corpus.set_sizes(10 * batches, [], 6, 2.0)) <= 12 * work
    # the linear schedule's work grows with the square of the data
    assert sum(corpus.set_sizes(50, [], 100, 2.0)) > 80 * sum(corpus.set_sizes(5, [], 100, 2.0))


def test_a_row_hashes_the_same_whether_or_not_its_file_has_a_column_without_values() -> None:
    header, rows = lines_of(real_csv_bytes())
    alone = table_of(csv_of(header, rows[:50]))  # no payer_code on any of these rows
    assert "payer_code" in contract.missing_feature_columns(alone)
    among_others = table_of(csv_of(header, rows[:50] + rows[-50:]))
    assert np.array_equal(corpus.row_hashes(alone), corpus.row_hashes(among_others)[:50])


def test_a_drop_is_split_into_new_rows_duplicates_and_conflicts() -> None:
    header, rows = lines_of(sample_csv(every=200))
    first = table_of(csv_of(header, rows[:300]))
    plan = corpus.plan_drop(first.column("encounter_id").to_numpy(), corpus.row_hashes(first), None)
    assert plan.status == corpus.APPEND and len(plan.new_rows) == 300
    index = pa.table(
        {
            "encounter_id": first.column("encounter_id"),
            "row_hash": pa.array(corpus.row_hashes(first), pa.uint64()),
        }
    )
    # rows 250..299 again (duplicates), rows 300..399 new, row 260 changed (a conflict), and
    # row 320 twice with two different contents (a conflict within the drop)
    changed_260, changed_320 = relabelled(rows[260]), relabelled(rows[320])
    assert changed_260 != rows[260] and changed_320 != rows[320]
    drop = [*rows[250:260], changed_260, *rows[261:400], changed_320, rows[305]]
    second = table_of(csv_of(header, drop))
    plan = corpus.plan_drop(
        second.column("encounter_id").to_numpy(), corpus.row_hashes(second), index
    )
    assert plan.status == corpus.APPEND
    assert plan.duplicates == 49 + 1  # 250..299 except 260, and row 305 repeated identically
    conflict_lines = sorted(c.line for c in plan.conflicts)
    assert conflict_lines == [2 + 10, 2 + 70, 2 + 150]  # 260, 320 and its changed twin
    assert len(plan.new_rows) == 100 - 1  # 300..399 except 320
    report = plan.report()
    assert report["conflicts"] == 3 and report["conflicting_rows"][0]["encounter_id"] > 0


def test_a_drop_that_mostly_rewrites_known_encounters_is_rejected() -> None:
    header, rows = lines_of(sample_csv(every=200))
    table = table_of(csv_of(header, rows[:100]))
    index = pa.table(
        {
            "encounter_id": table.column("encounter_id"),
            "row_hash": pa.array(corpus.row_hashes(table), pa.uint64()),
        }
    )
    flipped = [relabelled(r) for r in rows[:100]]
    drop = table_of(csv_of(header, flipped))
    plan = corpus.plan_drop(drop.column("encounter_id").to_numpy(), corpus.row_hashes(drop), index)
    assert (
        plan.status == corpus.REJECT and "100 of the file's 100 rows conflict" in plan.problems[0]
    )


def test_a_version_id_is_the_chain_of_its_drops() -> None:
    a = corpus.version_id(None, "a" * 64, 42, 15_000)
    assert a == corpus.version_id(None, "a" * 64, 42, 15_000) and len(a) == 16
    assert corpus.version_id(a, "b" * 64, 42, 15_000) != corpus.version_id(
        None, "b" * 64, 42, 15_000
    )
    assert corpus.version_id(None, "a" * 64, 7, 15_000) != a


# --------------------------------------------------------------------------- on SeaweedFS


@pytest.fixture(scope="module")
def store(seaweed_s3: SeaweedServer) -> ObjectStore:
    return ObjectStore(seaweed_s3.client())


def fresh_settings(store: ObjectStore, **overrides: object) -> Settings:
    stamp = f"{int(time.time() * 1000) % 10**8}-{next(_bucket_sets)}"
    buckets = Buckets(
        **{f: f"{getattr(Buckets, f)}-c{stamp}" for f in Buckets.__dataclass_fields__}
    )
    store.ensure_buckets(buckets.all())
    return replace(Settings(), buckets=buckets, **overrides)  # type: ignore[arg-type]


def drop(store: ObjectStore, settings: Settings, key: str, data: bytes) -> ingest.IngestOutcome:
    store.put_bytes(settings.buckets.raw, key, data, "text/csv")
    return ingest.ingest_object(store, settings, settings.buckets.raw, key)


def receipt(store: ObjectStore, settings: Settings, key: str) -> dict:
    info = store.head(settings.buckets.raw, key)
    assert info is not None
    return store.get_json(settings.buckets.datasets, keys.receipt_key(info.bucket, key, info.etag))


def test_two_halves_of_the_real_file_make_the_whole_corpus_and_keep_the_first_sets(
    store: ObjectStore,
) -> None:
    settings = fresh_settings(store)
    header, rows = lines_of(real_csv_bytes())
    half = len(rows) // 2
    first = drop(store, settings, "drops/first-half.csv", csv_of(header, rows[:half]))
    second = drop(store, settings, "drops/second-half.csv", csv_of(header, rows[half:]))
    assert first.status == second.status == ingest.INGESTED
    datasets = settings.buckets.datasets
    v1 = store.get_json(datasets, keys.manifest_key(first.dataset_id))
    v2 = store.get_json(datasets, keys.manifest_key(second.dataset_id))
    assert v2["parent"] == v1["version"] and v2["number"] == 2
    assert v2["drops"] == [*v1["drops"], keys.content_id(csv_of(header, rows[half:]))]
    # the corpus equals the whole file, split as the whole file would be
    assert v2["rows"]["total"] == 101_766 and v2["patients"]["total"] == 71_518
    whole = table_of(real_csv_bytes())
    from readmission.split import patient_split_codes

    codes = patient_split_codes(whole.column("patient_nbr").to_numpy(), settings.split_seed)
    assert [v2["rows"][n] for n in ("train", "validation", "test")] == [
        int(np.sum(codes == c)) for c in range(3)
    ]
    # immutable batches: version 1's sets are version 2's first sets, byte for byte
    assert v2["cumulative_sets"][: len(v1["cumulative_sets"])] == v1["cumulative_sets"]
    assert v2["reused_sets"] == len(v1["cumulative_sets"])
    assert v2["validation"]["keys"][0] == v1["validation"]["keys"][0]
    assert len(v2["test"]["keys"]) == 2 and v2["test"]["rows"] > v1["test"]["rows"]
    for name in ("train", "validation", "test"):
        assert abs(v2["class_shares"][name]["NO"] - 0.539) < 0.01
    # the new sets come first in the job order, the re-scored ones last
    reused = {
        keys.job_key(v2["version"], i, a)
        for i in range(v2["reused_sets"])
        for a in v2["algorithms"]
    }
    assert set(v2["jobs"][-len(reused) :]) == reused
    assert store.get_json(datasets, keys.CORPUS_HEAD_KEY)["version"] == second.dataset_id

    # the same file again under another name trains nothing and says so
    again = drop(store, settings, "drops/copy-of-first-half.csv", csv_of(header, rows[:half]))
    assert again.status == ingest.ALREADY_INGESTED and again.written == ()
    said = receipt(store, settings, "drops/copy-of-first-half.csv")
    assert "nothing is appended or trained again" in said["message"]
    # different bytes, all rows already in the corpus: no version, no job
    jobs_before = store.list_keys(settings.buckets.jobs)
    sample = csv_of(header, rows[::97])
    nothing = drop(store, settings, "drops/sample.csv", sample)
    assert nothing.status == ingest.NOTHING_NEW and nothing.dataset_id is None
    said = receipt(store, settings, "drops/sample.csv")
    assert said["status"] == "nothing_new" and said["rows"]["duplicates"] == len(rows[::97])
    assert "nothing trained" in said["message"]
    assert store.list_keys(settings.buckets.jobs) == jobs_before
    assert store.get_json(datasets, keys.CORPUS_HEAD_KEY)["version"] == second.dataset_id

    # the whole file with its labels shuffled rewrites known encounters: rejected, with a
    # report, and the corpus does not change
    labels = [row.rsplit(b",", 1)[1] for row in rows]
    random.Random(5).shuffle(labels)
    shuffled = [
        row.rsplit(b",", 1)[0] + b"," + label for row, label in zip(rows, labels, strict=True)
    ]
    data = csv_of(header, shuffled)
    rejected = drop(store, settings, "drops/shuffled-labels.csv", data)
    assert rejected.status == ingest.REJECTED
    assert "rewrites known encounters" in rejected.problems[0]
    report_key = keys.rejected_report_key(keys.content_id(data), "drops/shuffled-labels.csv")
    assert store.exists(settings.buckets.rejected, report_key)
    assert store.list_keys(settings.buckets.jobs) == jobs_before
    assert store.get_json(datasets, keys.CORPUS_HEAD_KEY)["version"] == second.dataset_id


def test_conflicting_rows_are_left_out_and_reported_by_line(store: ObjectStore) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    header, rows = lines_of(sample_csv(every=20))
    drop(store, settings, "base.csv", csv_of(header, rows[:3000]))
    changed = relabelled(rows[10])
    assert changed != rows[10]
    outcome = drop(store, settings, "more.csv", csv_of(header, [changed, *rows[3000:]]))
    assert outcome.status == ingest.INGESTED
    said = receipt(store, settings, "more.csv")
    encounter = int(rows[10].split(b",")[0])
    assert said["rows"]["conflicting_rows"] == [
        {
            "line": 2,
            "encounter_id": encounter,
            "reason": "the corpus holds this encounter_id with different values",
        }
    ]
    assert said["rows"]["new"] == len(rows) - 3000
    assert any("conflict" in warning for warning in said["warnings"])
    manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(outcome.dataset_id))
    assert manifest["rows"]["total"] == len(rows)  # the corpus kept its own row 10


def test_a_slice_with_a_column_of_only_question_marks_is_accepted_with_a_warning(
    store: ObjectStore,
) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    header, rows = lines_of(real_csv_bytes())
    outcome = drop(store, settings, "first-2000.csv", csv_of(header, rows[:2000]))
    assert outcome.status == ingest.INGESTED, outcome.summary()
    said = receipt(store, settings, "first-2000.csv")
    assert said["version"] == outcome.dataset_id
    assert any("payer_code" in warning for warning in said["warnings"])


def test_concurrent_drops_are_both_appended_one_after_the_other(store: ObjectStore) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    header, rows = lines_of(sample_csv(every=10))
    parts = {"a.csv": csv_of(header, rows[:4000]), "b.csv": csv_of(header, rows[4000:8000])}
    for key, data in parts.items():
        store.put_bytes(settings.buckets.raw, key, data, "text/csv")
    outcomes: dict[str, ingest.IngestOutcome] = {}

    def run(key: str) -> None:
        outcomes[key] = ingest.ingest_object(store, settings, settings.buckets.raw, key)

    threads = [threading.Thread(target=run, args=(key,)) for key in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {o.status for o in outcomes.values()} == {ingest.INGESTED}
    head = store.get_json(settings.buckets.datasets, keys.CORPUS_HEAD_KEY)
    last = store.get_json(settings.buckets.datasets, keys.manifest_key(head["version"]))
    assert last["number"] == 2 and last["rows"]["total"] == 8000
    assert sorted(last["drops"]) == sorted(
        hashlib.sha256(data).hexdigest()[:16] for data in parts.values()
    )


def test_a_later_drop_keeps_the_corpus_split_seed_and_batch_size(store: ObjectStore) -> None:
    settings = fresh_settings(store, batch_rows=1000)
    header, rows = lines_of(sample_csv(every=20))
    first = drop(store, settings, "one.csv", csv_of(header, rows[:2500]))
    changed = replace(settings, split_seed=7, batch_rows=500)
    store.put_bytes(settings.buckets.raw, "two.csv", csv_of(header, rows[2500:]), "text/csv")
    second = ingest.ingest_object(store, changed, settings.buckets.raw, "two.csv")
    manifest = store.get_json(settings.buckets.datasets, keys.manifest_key(second.dataset_id))
    assert manifest["parent"] == first.dataset_id
    assert (manifest["split_seed"], manifest["batch_rows"]) == (42, 1000)
    assert all(b["rows"] <= 1000 for b in manifest["batches"])
    assert any("SPLIT_SEED=42 and BATCH_ROWS=1000" in w for w in second.warnings)


def test_a_new_algorithm_is_fitted_on_the_old_sets_and_ordered_by_its_cost() -> None:
    order = jobs.job_order(
        [15_000, 30_000, 45_000], ["decision_tree", "gradient_boosting"], 2, ["decision_tree"]
    )
    # gradient boosting is new: its fits of the two old sets cost what fits cost
    assert order[:3] == [
        (2, "gradient_boosting"),
        (1, "gradient_boosting"),
        (0, "gradient_boosting"),
    ]
    assert order[-2:] == [(1, "decision_tree"), (0, "decision_tree")]
