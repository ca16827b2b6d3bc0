"""Label importers: generic CSV, RSNA 2019 ICH, CQ500 reads; mapping to the taxonomy, known masks, matching."""

from __future__ import annotations

import numpy as np
import pytest

from molre.data.ingest import discover
from molre.data.labels import CQ500_FINDINGS, RSNA_SUBTYPES, LabelTable, empty_row, load_labels
from molre.errors import DataError
from molre.findings import BY_ID, FINDING_IDS, NUM_FINDINGS
from tests.data.malformed import CQ500_HEADER, PHI_ID, cq500_row, rsna_images


def _index(fid: str) -> int:
    return BY_ID[fid].index


def _positives(row) -> set[str]:
    return {FINDING_IDS[i] for i in np.flatnonzero(row.labels)}


def _known(row) -> set[str]:
    return {FINDING_IDS[i] for i in np.flatnonzero(row.known)}


# ---------------------------------------------------------------------------------------------------- generic


def test_generic_subset_of_columns_leaves_the_rest_unknown(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(
        "study_id,patient_id,epidural_hematoma,midline_shift,mass_effect\n"
        f"study_001,{PHI_ID},1,0,\n"
        "study_002,,0,1,NA\n"
        f"study_001,{PHI_ID},1,0,\n"  # an identical repeat is harmless
    )
    table = load_labels(path)
    assert table.problems == [] and set(table.rows) == {"study_001", "study_002"}
    first, second = table.rows["study_001"], table.rows["study_002"]
    assert first.labels.dtype == np.uint8 and first.labels.shape == (NUM_FINDINGS,)
    assert _positives(first) == {"epidural_hematoma"}
    assert _known(first) == {"epidural_hematoma", "midline_shift"}  # the empty cell is unknown, not negative
    assert _positives(second) == {"midline_shift"} and _known(second) == {
        "epidural_hematoma",
        "midline_shift",
    }
    assert first.patient_id == PHI_ID and second.patient_id is None
    assert PHI_ID not in repr(first)


def test_generic_full_synth_table(tmp_path):
    path = tmp_path / "labels.csv"
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (3, NUM_FINDINGS))
    lines = ["study_id,patient_id," + ",".join(FINDING_IDS)]
    lines += [f"s{i},p{i // 2}," + ",".join(map(str, row)) for i, row in enumerate(truth)]
    path.write_text("\n".join(lines) + "\n")
    table = load_labels(path, "generic")
    for i, row in enumerate(truth):
        np.testing.assert_array_equal(table.rows[f"s{i}"].labels, row)
        assert table.rows[f"s{i}"].known.all()
    assert table.rows["s2"].patient_id == "p1"


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown labels format"):
        load_labels(tmp_path / "x.csv", "nih")


def test_missing_label_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labels(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------------- matching


def _row(positive: str):
    row = empty_row()
    row.labels[_index(positive)] = row.known[_index(positive)] = 1
    return row


def _table(**rows) -> LabelTable:
    """A table keyed like ``_table(s1="epidural_hematoma")``: one positive, known finding per study."""
    return LabelTable("labels.csv", "generic", {key: _row(positive) for key, positive in rows.items()})


def test_match_prefers_exact_then_most_specific_key():
    table = _table(**{"CQ500-CT-7": "epidural_hematoma", "1.2.3": "midline_shift"})
    assert table.match(["CT PLAIN THIN", "Unknown Study", "CQ500CT7 CQ500CT7", "1.2.3"]) == "1.2.3"
    assert table.match(["CT PLAIN THIN", "CQ500CT7 CQ500CT7", "9.9"]) == "CQ500-CT-7"  # normalised alias
    assert table.match(["CQ500CT70 CQ500CT70"]) is None  # no prefix matching: CT-70 is not CT-7


def test_uids_are_matched_exactly_only():
    table = _table(**{"1.2.3": "epidural_hematoma"})
    assert table.match(["123", "1-2-3"]) is None
    assert table.match(["123", "1.2.3"]) == "1.2.3"


def test_ambiguous_aliases_match_only_exactly():
    table = _table(**{"study-1": "epidural_hematoma", "study_1": "midline_shift"})
    assert table.match(["Study 1"]) is None
    assert table.match(["study_1"]) == "study_1"


def test_for_study_names_the_series_when_no_row_matches():
    with pytest.raises(DataError, match="no label row") as info:
        _table(s1="epidural_hematoma").for_study(("s2", "1.2.840.99"), "/data/s2")
    assert info.value.path == "/data/s2" and "1.2.840.99" not in str(info.value)


# ---------------------------------------------------------------------------------------------------- RSNA


def _rsna_csv(path, sops, positives: dict[tuple[int, int], set[str]]):
    """stage_2_train.csv as RSNA ships it: six rows per slice; ``positives[(study, slice)]`` are the 1s."""
    lines = ["ID,Label"]
    for s, ids in enumerate(sops):
        for k, sop in enumerate(ids):
            hits = positives.get((s, k), set())
            for subtype in RSNA_SUBTYPES:
                lines.append(f"{sop}_{subtype},{int(subtype in hits or (subtype == 'any' and bool(hits)))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rsna_slices_or_to_study_and_map_to_the_taxonomy(tmp_path):
    sops = rsna_images(tmp_path, n_studies=2)
    positives = {(0, 3): {"subdural"}, (0, 4): {"subdural", "intraventricular"}, (1, 9): {"epidural"}}
    path = _rsna_csv(tmp_path / "stage_2_train.csv", sops, positives)
    refs, _ = discover(tmp_path)
    table = load_labels(path, "rsna", series=refs)
    assert table.problems == [] and len(table) == 2
    by_study = {ref.study_uid: table.for_study(ref.study_keys, ref.source) for ref in refs}
    rows = [by_study[next(r.study_uid for r in refs if sops[s][0] in r.sop_uids)] for s in range(2)]
    assert _positives(rows[0]) == {"acute_subdural_hematoma", "intraventricular_hemorrhage"}
    assert _positives(rows[1]) == {"epidural_hematoma"}
    mapped = {fid for fid in RSNA_SUBTYPES.values() if fid}
    assert _known(rows[0]) == _known(rows[1]) == mapped and len(mapped) == 5  # the other 70 unknown


def test_rsna_accepts_a_ready_sop_index(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_abc123_epidural,1\nID_abc123_any,1\nID_def456_epidural,0\n")
    table = load_labels(path, "rsna", series={"ID_abc123": "1.2.3", "ID_def456": "1.2.3"})
    assert _positives(table.rows["1.2.3"]) == {"epidural_hematoma"}


def test_rsna_without_series_is_an_error(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_abc123_epidural,1\n")
    with pytest.raises(DataError, match="need the DICOM series"):
        load_labels(path, "rsna")


# ---------------------------------------------------------------------------------------------------- CQ500


def _reads(path, rows):
    path.write_text("\n".join([",".join(CQ500_HEADER)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_cq500_majority_of_three_readers(tmp_path):
    path = _reads(
        tmp_path / "reads.csv",
        [
            cq500_row("CQ500-CT-0", {"SDH": (1, 1, 0), "EDH": (1, 0, 0), "ICH": (1, 1, 1)}),
            cq500_row(
                "CQ500-CT-1",
                {"CalvarialFracture": (0, 1, 1), "MidlineShift": (1, 1, 1), "Fracture": (1, 1, 1)},
            ),
            cq500_row(
                "CQ500-CT-2", {"ChronicBleed": (1, 0, 1), "OtherFracture": (1, 1, 0), "MassEffect": (0, 0, 1)}
            ),
        ],
    )
    table = load_labels(path, "cq500")
    assert table.problems == []
    assert _positives(table.rows["CQ500-CT-0"]) == {"acute_subdural_hematoma"}  # EDH 1 of 3: negative
    assert _positives(table.rows["CQ500-CT-1"]) == {"skull_fracture", "midline_shift"}
    assert _positives(table.rows["CQ500-CT-2"]) == {"chronic_subdural_hematoma", "skull_base_fracture"}
    assert _known(table.rows["CQ500-CT-0"]) == set(CQ500_FINDINGS.values()) and len(CQ500_FINDINGS) == 10


def test_cq500_names_match_download_folder_names(tmp_path):
    path = _reads(tmp_path / "reads.csv", [cq500_row("CQ500-CT-12", {"SAH": (1, 1, 1)})])
    table = load_labels(path, "cq500")
    row = table.for_study(("CT 5mm", "Unknown Study", "CQ500CT12 CQ500CT12", "1.2.3"), "/cq500/CQ500CT12")
    assert _positives(row) == {"subarachnoid_hemorrhage"}


def test_cq500_missing_reader_column_leaves_that_finding_unknown(tmp_path):
    header = [h for h in CQ500_HEADER if h != "R2:IVH"]
    row = [
        v
        for v, h in zip(cq500_row("CQ500-CT-0", {"IVH": (1, 1, 1)}), CQ500_HEADER, strict=True)
        if h != "R2:IVH"
    ]
    path = tmp_path / "reads.csv"
    path.write_text(",".join(header) + "\n" + ",".join(map(str, row)) + "\n")
    table = load_labels(path, "cq500")
    assert [p.reason for p in table.problems] == [
        "missing reader column R2:IVH: intraventricular_hemorrhage left unknown for every study"
    ]
    assert "intraventricular_hemorrhage" not in _known(table.rows["CQ500-CT-0"])
    assert len(_known(table.rows["CQ500-CT-0"])) == 9
