"""Descriptor changes and loads racing each other: every writer either wins whole or gets a 409,
never a lost revision, a 500, or a version whose descriptor no longer matches its snapshot.
Real threads, real transactions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

import sandbox.engine.store as store
from catalog.descriptor import PACKAGED_DESCRIPTORS, DatasetDescriptor, parse_descriptor_text
from catalog.models import Dataset, DatasetField, DatasetRevision, DatasetVersion
from catalog.service import apply_descriptor
from pdao.kernel.errors import PdaoError
from sandbox.engine.store import load_version
from tests.test_store import resident_table, write

RESIDENT = (PACKAGED_DESCRIPTORS / "health.resident.yaml").read_text(encoding="utf-8")
THREADS = 8


def descriptor(text: str = RESIDENT, **update) -> DatasetDescriptor:
    d, problems = parse_descriptor_text(text, "x.yaml")
    assert d is not None, problems
    return d.model_copy(update=update) if update else d


def retitled(i: int) -> DatasetDescriptor:
    d = descriptor()
    return d.model_copy(update={"title": d.title.model_copy(update={"en": f"Resident record, edit {i}"})})


def without_last_field() -> DatasetDescriptor:
    d = descriptor()
    return d.model_copy(update={"fields": d.fields[:-1]})


def outcome(fn) -> str:  # noqa: ANN001
    """What a writer got: its answer, or the code of its refusal; anything else is a failure."""
    try:
        return fn()
    except PdaoError as e:
        assert e.status in (409, 422), (e.status, e.code)
        return e.code


def apply_and_commit(engine, d: DatasetDescriptor) -> str:
    with Session(engine) as s:
        action = apply_descriptor(s, d)
        s.commit()
        return action


def run_together(fns) -> list:  # noqa: ANN001
    """Start every fn at once (one thread each) and answer their outcomes, in order."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = outcome(fns[i])
        except BaseException as e:  # noqa: BLE001 - reported below as the failure it is
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


def dataset(engine, code: str = "health.resident") -> Dataset:
    with Session(engine) as s:
        return s.exec(select(Dataset).where(Dataset.code == code)).one()


def history(engine, ds: Dataset) -> list[DatasetRevision]:
    with Session(engine) as s:
        return list(s.exec(select(DatasetRevision).where(DatasetRevision.dataset_id == ds.id)
                           .order_by(DatasetRevision.revision)).all())


def field_names(engine, ds: Dataset) -> list[str]:
    with Session(engine) as s:
        return list(s.exec(select(DatasetField.name).where(DatasetField.dataset_id == ds.id)
                           .order_by(DatasetField.position)).all())


def count(engine, model) -> int:  # noqa: ANN001
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def test_concurrent_updates_never_lose_a_revision(engine):
    results = run_together([lambda i=i: apply_and_commit(engine, retitled(i)) for i in range(THREADS)])
    assert set(results) <= {"updated", "concurrent_change"}, results
    won = results.count("updated")
    assert won >= 1
    ds = dataset(engine)
    assert ds.revision == 1 + won, f"{won} updates acknowledged, revision is {ds.revision}"
    revs = history(engine, ds)
    assert [r.revision for r in revs] == list(range(1, ds.revision + 1))
    assert revs[-1].sha256 == ds.descriptor_sha256 and revs[-1].descriptor["title"]["en"] == ds.title_en
    assert len({r.sha256 for r in revs}) == len(revs)
    assert field_names(engine, ds) == [f.name for f in descriptor().fields]


def test_concurrent_shape_changes_leave_one_consistent_descriptor(engine):
    """Alternating shapes (all allowed: nothing is loaded): the fields always match the revision."""
    fns = [lambda i=i: apply_and_commit(engine, without_last_field() if i % 2 else retitled(i)) for i in range(THREADS)]
    results = run_together(fns)
    assert set(results) <= {"updated", "unchanged", "concurrent_change"}, results
    ds = dataset(engine)
    [last] = history(engine, ds)[-1:]
    assert last.sha256 == ds.descriptor_sha256
    assert field_names(engine, ds) == [f["name"] for f in last.descriptor["fields"]]


def test_concurrent_creates_of_one_code_give_one_dataset_and_no_500(engine):
    new = descriptor(RESIDENT.replace("code: health.resident", "code: health.resident_copy"))
    results = run_together([lambda: apply_and_commit(engine, new) for _ in range(THREADS)])
    assert results.count("created") == 1, results
    assert set(results) <= {"created", "unchanged", "concurrent_change"}, results
    ds = dataset(engine, "health.resident_copy")
    assert ds.revision == 1 and [r.revision for r in history(engine, ds)] == [1]
    assert len(field_names(engine, ds)) == len(new.fields)


def test_concurrent_registrations_over_http_answer_409_not_500(client, auth):
    from tests.test_catalog_api import PACKAGED

    headers = auth("provider1")
    body = {**PACKAGED["health.resident"], "code": "health.resident_http"}
    bodies = [{**body, "title": {"zh": "居民", "en": f"Residents {i}"}} for i in range(THREADS)]
    results = run_together([lambda b=b: client.post("/api/v1/datasets", json=b, headers=headers).status_code
                            for b in bodies])
    assert set(results) <= {200, 201, 409}, results
    assert any(r in (200, 201) for r in results)


# --- a load and a descriptor change at the same time ---------------------------------------------

def _load(engine, settings, path: Path) -> tuple:
    with Session(engine) as s:
        v, _ = load_version(s, settings, "health.resident", path)
        return v


def test_an_incompatible_change_during_a_load_makes_the_load_refuse(engine, settings, tmp_path, monkeypatch):
    """The descriptor changes after the file was checked against it: the load must not commit a
    version of the old shape (409 descriptor_changed, no row, no file)."""
    real = store._sha256
    changed = []

    def change_then_hash(path: Path) -> str:
        if not changed:  # between the check and the registration
            changed.append(apply_and_commit(engine, without_last_field()))
        return real(path)

    monkeypatch.setattr(store, "_sha256", change_then_hash)
    with pytest.raises(PdaoError) as err:
        _load(engine, settings, write(resident_table(20), tmp_path / "a.parquet"))
    assert changed == ["updated"]
    assert (err.value.status, err.value.code) == (409, "descriptor_changed")
    ds = dataset(engine)
    assert (ds.revision, ds.version_count) == (2, 0)
    assert count(engine, DatasetVersion) == 0
    assert not [p for p in settings.domain_dir.rglob("*") if p.is_file()]
    assert not [p for p in settings.staging_dir.iterdir() if p.is_file()]


def test_a_compatible_change_during_a_load_lets_it_through_on_the_new_revision(engine, settings, tmp_path,
                                                                               monkeypatch):
    real = store._sha256
    changed = []

    def retitle_then_hash(path: Path) -> str:
        if not changed:
            changed.append(apply_and_commit(engine, retitled(1)))
        return real(path)

    monkeypatch.setattr(store, "_sha256", retitle_then_hash)
    v = _load(engine, settings, write(resident_table(20), tmp_path / "a.parquet"))
    assert changed == ["updated"] and v.dataset_revision == 2
    ds = dataset(engine)
    assert (ds.revision, ds.version_count) == (2, 1)


@pytest.mark.parametrize(("change", "refusal"), [
    (without_last_field, "descriptor_incompatible"),
    # loosening is only allowed while nothing is loaded
    (lambda: descriptor(RESIDENT.replace("opening_class: conditional", "opening_class: unconditional")),
     "reclassification_refused"),
])
def test_a_change_that_needs_no_versions_loses_to_a_load_in_progress(engine, settings, tmp_path, monkeypatch,
                                                                     change, refusal):
    """The change is decided while the load holds the dataset row (claimed, not yet committed):
    it waits, then sees the version and is refused; the version stands."""
    real = store._link_snapshot
    update: dict = {}

    def change_while_claimed(*args):  # noqa: ANN002, ANN202
        if "thread" not in update:
            t = threading.Thread(target=lambda: update.setdefault("result", outcome(
                lambda: apply_and_commit(engine, change()))))
            update["thread"] = t
            t.start()
            time.sleep(1.0)
            update["waited"] = t.is_alive()  # it must be waiting for the load's transaction
        return real(*args)

    monkeypatch.setattr(store, "_link_snapshot", change_while_claimed)
    v = _load(engine, settings, write(resident_table(20), tmp_path / "a.parquet"))
    update["thread"].join(60)
    assert update["waited"], "the change did not wait for the load"
    assert update["result"] == refusal, update
    ds = dataset(engine)
    assert (ds.revision, ds.version_count, v.dataset_revision, v.number) == (1, 1, 1, 1)
    assert field_names(engine, ds) == [f.name for f in descriptor().fields]


def test_concurrent_loads_number_their_versions_without_gaps(engine, settings, tmp_path):
    n = 4
    paths = [write(resident_table(10 + i, start=100 * i), tmp_path / f"{i}.parquet") for i in range(n)]
    results = run_together([lambda p=p: _load(engine, settings, p) for p in paths])
    assert sorted(v.number for v in results) == list(range(1, n + 1)), results
    assert dataset(engine).version_count == n
    assert len([p for p in (settings.domain_dir / "health.resident" / "prod").iterdir()]) == n
