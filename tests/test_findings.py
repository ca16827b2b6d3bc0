import re

import pytest

from molre.findings import CATEGORY_SIZES, FINDING_IDS, FINDINGS, NUM_FINDINGS, finding, ids_in


def test_75_findings_in_six_categories_of_the_paper():
    assert NUM_FINDINGS == 75 == len(set(FINDING_IDS))
    assert {c: len(ids_in(c)) for c in CATEGORY_SIZES} == {
        "hemorrhage": 12, "vascular": 8, "trauma": 6, "mass_lesion": 9, "structural": 11, "chronic_other": 29,
    }  # fmt: skip
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", f) for f in FINDING_IDS)
    assert [f.index for f in FINDINGS] == list(range(75))
    assert finding("epidural_hematoma").category == "hemorrhage"


def test_unknown_id_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown finding id 'bleed'"):
        finding("bleed")
