"""Descriptor validation: a bad descriptor is refused with file, line and what is wrong, and an
import is all-or-nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from catalog.descriptor import PACKAGED_DESCRIPTORS, parse_descriptor_text
from catalog.models import Dataset, Organization
from catalog.service import DescriptorsRefused, import_descriptors

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
    """One bad file among good ones: nothing of the set is imported, and the report names it."""
    folder = tmp_path / "descriptors"
    folder.mkdir()
    new_org = "organizations:\n  - code: ycmzj\n    name: {zh: 银川市民政局, en: Civil Affairs Bureau}\n    kind: department\n"
    (folder / "organizations.yaml").write_text(new_org, encoding="utf-8")
    good = GOOD.replace("health.inpatient_stay", "health.inpatient_stay_copy")
    (folder / "a_good.yaml").write_text(good, encoding="utf-8")
    (folder / "b_bad.yaml").write_text(good.replace("health.inpatient_stay_copy", "health.other")
                                       .replace("grade: 3\n", "grade: 0\n"), encoding="utf-8")
    before = (_count(engine, Dataset), _count(engine, Organization))
    with pytest.raises(DescriptorsRefused) as err, Session(engine) as session:
        import_descriptors(session, [folder])
        session.commit()
    assert [(Path(p.file).name, p.path) for p in err.value.problems] == [("b_bad.yaml", "grade")]
    assert (_count(engine, Dataset), _count(engine, Organization)) == before

    (folder / "b_bad.yaml").unlink()
    with Session(engine) as session:
        report = import_descriptors(session, [folder])
        session.commit()
    assert report.datasets == {"health.inpatient_stay_copy": "created"}
    assert report.organizations == {"ycmzj": "created"}
    assert _count(engine, Dataset) == before[0] + 1


def test_dataset_of_unknown_department_is_refused_whole(engine, tmp_path: Path):
    shutil.copy(PACKAGED_DESCRIPTORS / "health.resident.yaml", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(GOOD.replace("health.inpatient_stay", "health.x")
                                     .replace("source_department: ycwjw", "source_department: nobody"), encoding="utf-8")
    before = _count(engine, Dataset)
    with pytest.raises(DescriptorsRefused) as err, Session(engine) as session:
        import_descriptors(session, [tmp_path])
    assert "nobody" in err.value.problems[0].message
    assert _count(engine, Dataset) == before


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
