"""Descriptor validation: a bad descriptor is refused with file, line and what is wrong, and an
import is all-or-nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from catalog.descriptor import (
    PACKAGED_DESCRIPTORS,
    Masking,
    Sensitivity,
    parse_descriptor_text,
    reclassification_changes,
    state_of,
)
from catalog.models import Dataset, DatasetRevision
from catalog.service import DescriptorsRefused, apply_descriptor, import_descriptors
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.models import Organization

GOOD = (PACKAGED_DESCRIPTORS / "health.inpatient_stay.yaml").read_text(encoding="utf-8")


def problems_of(text: str) -> list:
    desc, problems = parse_descriptor_text(text, "x.yaml")
    assert desc is None, "the descriptor should have been refused"
    return problems


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing needle."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[nth - 1]


def test_packaged_descriptors_are_valid():
    for f in sorted(PACKAGED_DESCRIPTORS.glob("health.*.yaml")):
        desc, problems = parse_descriptor_text(f.read_text(encoding="utf-8"), f.name)
        assert problems == [] and desc is not None and desc.code == f.stem


@pytest.mark.parametrize(
    ("old", "new", "needle", "path", "message"),
    [
        # an unknown enum value, pointed at on its own line
        ("    type: decimal\n", "    type: money\n", "type: money", "fields[10].type", "got 'money'"),
        ("grade: 3\n", "grade: 7\n", "grade: 7", "grade", "less than or equal to 5"),
        ("opening_class: conditional", "opening_class: open", "opening_class: open", "opening_class", "got 'open'"),
        # an unknown key (a typo) is not silently ignored
        ("update_cycle: daily", "update_cycel: daily", "update_cycel", "update_cycel", "unknown key"),
        # identifiers must be masked
        ("    masking: pseudonym\n    nullable: false\n    description: {zh: 住院流水号",
         "    masking: none\n    nullable: false\n    description: {zh: 住院流水号",
         "masking: none", "fields[0].masking", "masking other than 'none'"),
        # free text must go through the PII recognizers or be suppressed
        ("    masking: pii_redact\n", "    masking: none\n", "masking: none", "fields[11].masking", "pii_redact"),
        # a value domain only makes sense on strings
        ("    type: integer\n    sensitivity: sensitive\n    masking: none\n    nullable: false\n    bounds: {min: 0, max: 180}",
         "    type: integer\n    sensitivity: sensitive\n    masking: none\n    nullable: false\n    domain: [a, b]",
         "domain: [a, b]", "fields[7].domain", "only for string"),
        ("bounds: {min: 0, max: 180}", "bounds: {min: 200, max: 180}", "min: 200", "fields[7].bounds", "min is greater"),
        ("privacy_unit: person_id", "privacy_unit: patient", "privacy_unit: patient", "privacy_unit", "not a field"),
        ("  - name: total_cost\n", "  - name: Total-Cost\n", "Total-Cost", "fields[10].name", "pattern"),
        ("  - name: notes\n", "  - name: main_icd10\n", "name: main_icd10", "fields[11].name", "duplicate field"),
        # bounds must fit the storage type, or every load would fail on the cast later
        ("bounds: {min: 0, max: 180}", "bounds: {min: 0,\n      max: 1.0e+19}", "max: 1.0e+19",
         "fields[7].bounds.max", "BIGINT"),
        ("bounds: {min: 0, max: 180}", "bounds: {min: 0.5, max: 180}", "min: 0.5", "fields[7].bounds.min",
         "whole numbers"),
        ("bounds: {min: 0, max: 500000}", "bounds: {min: 0, max: 1.0e+16}", "max: 1.0e+16", "fields[10].bounds.max",
         "DECIMAL(18,2)"),
        ("bounds: {min: 0, max: 500000}", "bounds: {min: 0.001, max: 500000}", "min: 0.001", "fields[10].bounds.min",
         "decimal places"),
        ("bounds: {min: 0, max: 500000}", "bounds: {min: 0, max: .inf}", "max: .inf", "fields[10].bounds.max",
         "finite"),
    ],
)
def test_bad_descriptor_names_file_line_and_problem(old, new, needle, path, message):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    problems = problems_of(text)
    hit = [p for p in problems if p.path == path]
    assert hit, [str(p) for p in problems]
    # the line of the changed text that holds the needle
    start = GOOD.index(old)
    expected = text[:start].count("\n") + 1 + next(i for i, ln in enumerate(new.split("\n")) if needle in ln)
    assert hit[0].line == expected
    assert hit[0].file == "x.yaml"
    assert message in hit[0].message
    assert str(hit[0]).startswith(f"x.yaml:{hit[0].line}: {path}: ")


def test_missing_required_key_points_at_its_mapping():
    text = GOOD.replace("standard: \"WS 445-2014 电子病历基本数据集 住院病案首页\"\n", "")
    [p] = problems_of(text)
    assert p.path == "standard" and p.message == "required key is missing" and p.line == 1


def test_yaml_syntax_error_and_duplicate_keys_have_lines():
    [p] = problems_of(GOOD.replace("grade: 3\n", "grade: [3\n"))
    assert p.line is not None and p.message.startswith("YAML")
    text = GOOD.replace("grade: 3\n", "grade: 3\ngrade: 4\n")
    [p] = problems_of(text)
    assert "duplicate key 'grade'" in p.message and p.line == line_of(text, "grade: 4")


def test_not_a_mapping():
    [p] = problems_of("- just\n- a list\n")
    assert "mapping" in p.message


def _count(engine, model) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def test_import_is_all_or_nothing(engine, tmp_path: Path):
    """A set with a new organization, a new dataset and one file refused only at the apply stage
    (after the others were written): the refusal names the file and line, and even a commit made
    afterwards in the same session commits nothing of the set."""
    folder = tmp_path / "descriptors"
    folder.mkdir()
    new_org = "organizations:\n  - code: ycmzj\n    name: {zh: 银川市民政局, en: Civil Affairs Bureau}\n    kind: department\n"
    (folder / "organizations.yaml").write_text(new_org, encoding="utf-8")
    good = GOOD.replace("health.inpatient_stay", "health.inpatient_stay_copy")
    (folder / "a_good.yaml").write_text(good, encoding="utf-8")
    # valid on its own, and its department is in the set: refused when applied (one datum, one source)
    moved = GOOD.replace("source_department: ycwjw", "source_department: ycmzj")
    (folder / "b_bad.yaml").write_text(moved, encoding="utf-8")
    before = (_count(engine, Dataset), _count(engine, Organization), _count(engine, DatasetRevision))
    with Session(engine) as session:
        with pytest.raises(DescriptorsRefused) as err:
            import_descriptors(session, [folder])
        session.commit()  # whatever the caller does next must not half-apply the set
    with Session(engine) as s:
        assert s.exec(select(Organization).where(Organization.code == "ycmzj")).first() is None
        assert s.exec(select(Dataset).where(Dataset.code == "health.inpatient_stay_copy")).first() is None
    assert (_count(engine, Dataset), _count(engine, Organization), _count(engine, DatasetRevision)) == before
    [p] = err.value.problems
    assert (Path(p.file).name, p.path, p.line) == ("b_bad.yaml", "source_department",
                                                   line_of(moved, "source_department:"))

    (folder / "b_bad.yaml").unlink()
    with Session(engine) as session:
        report = import_descriptors(session, [folder])
        session.commit()
    assert report.datasets == {"health.inpatient_stay_copy": "created"}
    assert report.organizations == {"ycmzj": "created"}
    assert _count(engine, Dataset) == before[0] + 1


def test_dataset_of_unknown_department_is_refused_whole_with_file_and_line(engine, tmp_path: Path):
    shutil.copy(PACKAGED_DESCRIPTORS / "health.resident.yaml", tmp_path / "a.yaml")
    bad = GOOD.replace("health.inpatient_stay", "health.x").replace("source_department: ycwjw",
                                                                    "source_department: nobody")
    (tmp_path / "b.yaml").write_text(bad, encoding="utf-8")
    # a known organization that is not a department cannot be a source either
    company = GOOD.replace("health.inpatient_stay", "health.y").replace("source_department: ycwjw",
                                                                        "source_department: company_a")
    (tmp_path / "c.yaml").write_text(company, encoding="utf-8")
    before = _count(engine, Dataset)
    with pytest.raises(DescriptorsRefused) as err, Session(engine) as session:
        import_descriptors(session, [tmp_path])
    got = {Path(p.file).name: p for p in err.value.problems}
    assert set(got) == {"b.yaml", "c.yaml"}
    assert "nobody" in got["b.yaml"].message and got["b.yaml"].path == "source_department"
    assert got["b.yaml"].line == line_of(bad, "source_department: nobody")
    assert "company" in got["c.yaml"].message and got["c.yaml"].line == line_of(company, "source_department:")
    assert _count(engine, Dataset) == before


def test_a_department_defined_in_the_same_set_is_known(engine, tmp_path: Path):
    (tmp_path / "organizations.yaml").write_text(
        "organizations:\n  - code: ycmzj\n    name: {zh: 银川市民政局, en: Civil Affairs Bureau}\n    kind: department\n",
        encoding="utf-8")
    (tmp_path / "x.yaml").write_text(GOOD.replace("health.inpatient_stay", "health.z")
                                     .replace("source_department: ycwjw", "source_department: ycmzj"), encoding="utf-8")
    with Session(engine) as session:
        assert import_descriptors(session, [tmp_path]).datasets == {"health.z": "created"}
        session.commit()


def test_reimport_is_unchanged_and_a_change_bumps_the_revision(engine, tmp_path: Path):
    with Session(engine) as session:
        report = import_descriptors(session, [PACKAGED_DESCRIPTORS])
        session.commit()
    assert set(report.datasets.values()) == {"unchanged"}
    (tmp_path / "x.yaml").write_text(GOOD.replace("update_cycle: daily", "update_cycle: weekly"), encoding="utf-8")
    with Session(engine) as session:
        assert import_descriptors(session, [tmp_path / "x.yaml"]).datasets == {"health.inpatient_stay": "updated"}
        session.commit()
        ds = session.exec(select(Dataset).where(Dataset.code == "health.inpatient_stay")).one()
        assert (ds.revision, ds.update_cycle) == (2, "weekly")


# --- reclassification after load, and the history of revisions -----------------------------------

def _desc(text: str = GOOD):
    desc, problems = parse_descriptor_text(text, "x.yaml")
    assert desc is not None, [str(p) for p in problems]
    return desc


def _changed(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# hospital is fields[2] (quasi_identifier, grade 2, masking none, a domain); length_of_stay is
# fields[7] (sensitive, bounds 0..180); stay_id is fields[0] (identifier, pseudonym); person_id is
# fields[1] (pii_kind person_key); notes is fields[11] (free_text, pii_redact, nullable).
LOOSENING = [
    ("grade: 3\nopening_class", "grade: 2\nopening_class", "grade"),
    ("opening_class: conditional", "opening_class: unconditional", "opening_class"),
    ("    masking: none\n    grade: 2\n    nullable: false\n    domain: [宁夏医科大学总医院",
     "    masking: none\n    grade: 1\n    nullable: false\n    domain: [宁夏医科大学总医院", "fields[2].grade"),
    ("    type: integer\n    sensitivity: sensitive\n    masking: none\n    nullable: false\n    bounds: {min: 0, max: 180}",
     "    type: integer\n    sensitivity: quasi_identifier\n    masking: none\n    nullable: false\n    bounds: {min: 0, max: 180}",
     "fields[7].sensitivity"),
    ("    sensitivity: free_text\n    masking: pii_redact", "    sensitivity: free_text\n    masking: suppress",
     None),  # tightening: allowed
    ("    pii_kind: person_key\n", "    pii_kind: cn_id\n", "fields[1].pii_kind"),
    ("bounds: {min: 0, max: 180}", "bounds: {min: 1, max: 180}", "fields[7].bounds"),
    ("bounds: {min: 0, max: 180}", "bounds: {min: 0, max: 365}", None),  # widening: allowed
    ("domain: [兴庆区, 金凤区, 西夏区, 永宁县, 贺兰县, 灵武市]", "domain: [兴庆区, 金凤区, 西夏区, 永宁县, 贺兰县]",
     "fields[3].domain"),
    ("domain: [兴庆区, 金凤区, 西夏区, 永宁县, 贺兰县, 灵武市]",
     "domain: [兴庆区, 金凤区, 西夏区, 永宁县, 贺兰县, 灵武市, 其他]", None),  # widening: allowed
    ("    masking: pii_redact\n    description: {zh: 出院小结",
     "    masking: pii_redact\n    nullable: false\n    description: {zh: 出院小结", "fields[11].nullable"),
    ("privacy_unit: person_id", "privacy_unit: stay_id", "privacy_unit"),
    ("update_cycle: daily", "update_cycle: weekly", None),  # metadata
    ("title: {zh: 住院病案首页, en: Inpatient stays}", "title: {zh: 住院病案首页（新）, en: Inpatient stays (new)}", None),
    ("keywords: [住院, 病案首页, inpatient, stay, hospitalization]", "keywords: [住院]", None),
    ("grade: 3\nopening_class: conditional", "grade: 4\nopening_class: prohibited", None),  # tightening
]


@pytest.mark.parametrize(("old", "new", "path"), LOOSENING)
def test_reclassification_rules_are_a_pure_function(old, new, path):
    before, after = state_of(_desc()), state_of(_desc(_changed(old, new)))
    changes = reclassification_changes(before, after)
    if path is None:
        assert changes == []
    else:
        assert path in [c.path for c in changes], changes
        for c in changes:
            assert c.message and c.message_zh and c.message != c.message_zh


def test_masking_none_and_public_are_loosening():
    d = _desc()
    stay = d.fields[0]
    loose = d.model_copy(update={"fields": [stay.model_copy(update={"masking": Masking.none,
                                                                     "sensitivity": Sensitivity.public}),
                                            *d.fields[1:]]})
    paths = {c.path for c in reclassification_changes(state_of(d), state_of(loose))}
    assert paths == {"fields[0].masking", "fields[0].sensitivity"}
    # and back is tightening
    assert reclassification_changes(state_of(loose), state_of(d)) == []


def _load_inpatient(engine, settings, tmp_path):
    """Load one small version of health.inpatient_stay (from the test of the domain store's data)."""
    from sandbox.engine.store import load_version
    from tests.test_store import stay_table, write

    with Session(engine) as session:
        v, _ = load_version(session, settings, "health.inpatient_stay", write(stay_table(5), tmp_path / "s.parquet"))
    return v


@pytest.mark.parametrize(("old", "new", "path"), [c for c in LOOSENING if c[2] is not None])
def test_loosening_a_loaded_dataset_is_refused_with_file_and_line(engine, settings, tmp_path, old, new, path):
    _load_inpatient(engine, settings, tmp_path)
    text = _changed(old, new)
    f = tmp_path / "stay.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(DescriptorsRefused) as err, Session(engine) as session:
        import_descriptors(session, [f])
    hit = [p for p in err.value.problems if p.path == path]
    assert hit, [str(p) for p in err.value.problems]
    changed_line = text[:GOOD.index(old)].count("\n") + 1 + next(
        i for i, ln in enumerate(new.split("\n")) if ln not in old.split("\n"))
    assert (Path(hit[0].file).name, hit[0].line) == ("stay.yaml", changed_line)
    assert hit[0].message_zh
    # and through the service directly: 409 reclassification_refused with per-field details
    with Session(engine) as session, pytest.raises(PdaoError) as e2:
        apply_descriptor(session, _desc(text))
    assert (e2.value.status, e2.value.code) == (409, "reclassification_refused")
    assert path in [d["path"] for d in e2.value.details] and all(d["message_zh"] for d in e2.value.details)
    with Session(engine) as s:
        assert s.exec(select(Dataset.revision).where(Dataset.code == "health.inpatient_stay")).one() == 1


def test_tightening_and_metadata_stay_allowed_after_load(engine, settings, tmp_path):
    _load_inpatient(engine, settings, tmp_path)
    text = _changed("grade: 3\nopening_class: conditional", "grade: 4\nopening_class: prohibited")
    text = text.replace("update_cycle: daily", "update_cycle: weekly").replace(
        "bounds: {min: 0, max: 180}", "bounds: {min: 0, max: 365}")
    with Session(engine) as session:
        assert apply_descriptor(session, _desc(text)) == "updated"
        session.commit()


def test_a_shape_change_after_load_names_the_field_and_line(engine, settings, tmp_path):
    _load_inpatient(engine, settings, tmp_path)
    text = GOOD.replace("    type: integer\n    sensitivity: sensitive", "    type: float\n    sensitivity: sensitive", 1)
    f = tmp_path / "stay.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(DescriptorsRefused) as err, Session(engine) as session:
        import_descriptors(session, [f])
    [p] = err.value.problems
    assert (p.path, p.line) == ("fields[7].type", line_of(text, "type: float"))


def test_every_revision_is_kept_and_versions_point_at_one(engine, settings, tmp_path):
    v1 = _load_inpatient(engine, settings, tmp_path)
    widened = _changed("bounds: {min: 0, max: 180}", "bounds: {min: 0, max: 365}")
    with Session(engine) as session:
        assert apply_descriptor(session, _desc(widened)) == "updated"
        session.commit()
    v2 = _load_inpatient(engine, settings, tmp_path)
    with Session(engine) as s:
        ds = s.exec(select(Dataset).where(Dataset.code == "health.inpatient_stay")).one()
        revs = s.exec(select(DatasetRevision).where(DatasetRevision.dataset_id == ds.id)
                      .order_by(DatasetRevision.revision)).all()
        assert [r.revision for r in revs] == [1, 2] and ds.revision == 2 and ds.version_count == 2
        assert revs[0].sha256 == _desc().sha256() and revs[1].sha256 == ds.descriptor_sha256
        assert revs[1].descriptor == _desc(widened).model_dump(mode="json")
        assert (v1.dataset_revision, v2.dataset_revision) == (1, 2)
        for v in (v1, v2):
            assert s.exec(select(DatasetRevision).where(DatasetRevision.dataset_id == ds.id,
                                                        DatasetRevision.revision == v.dataset_revision)).one()


def test_a_revision_row_cannot_be_rewritten(engine):
    with Session(engine) as s:
        rev = s.exec(select(DatasetRevision)).first()
        rev.sha256 = "0" * 64
        s.add(rev)
        with pytest.raises(ValueError, match="immutable"):
            s.flush()
