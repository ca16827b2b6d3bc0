"""Every malformed input ends in a DataError naming it, with the expected reason; good inputs beside them load;
counts reconcile; planted PHI never appears in a message, a log record or a warning."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from molre.data.ingest import discover, load_series
from molre.data.labels import load_labels
from molre.errors import DataError
from tests.data.malformed import LABEL_CASES, PHI_SHORT_MRN, PHI_STRINGS, VOLUME_CASES, write_corpus


def _assert_no_phi(text: str) -> None:
    for phi in (*PHI_STRINGS, PHI_SHORT_MRN):
        assert phi.lower() not in text.lower(), f"planted PHI {phi!r} leaked: {text}"


def _ingest(input_dir: Path, labels_path: Path):
    """discover -> load -> match labels, as preprocess does; returns (loaded sources, errors)."""
    table = load_labels(labels_path)
    refs, errors = discover(input_dir)
    loaded = []
    for ref in refs:
        try:
            volume = load_series(ref)
            table.for_study(volume.study_keys, volume.source)
        except DataError as err:
            errors.append(err)
        else:
            loaded.append(ref.source)
    return refs, loaded, errors


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """The whole corpus ingested once, with every warning and every log record (any logger, DEBUG up) kept."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    root, records = logging.getLogger(), _Records()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            refs, loaded, errors = _ingest(corpus.input_dir, corpus.labels)
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return corpus, refs, loaded, errors, [str(w.message) for w in caught] + records.lines


def test_corpus_has_at_least_25_cases():
    assert len(VOLUME_CASES) + len(LABEL_CASES) >= 25
    names = [c.name for c in (*VOLUME_CASES, *LABEL_CASES)]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", VOLUME_CASES, ids=lambda c: c.name)
def test_each_bad_volume_is_rejected_with_its_reason(case, corpus_run):
    corpus, _, _, errors, _ = corpus_run
    folder = str(corpus.input_dir / case.name)
    mine = [e for e in errors if e.path == folder or e.path.startswith(folder + "/")]
    assert len(mine) == 1, [str(e) for e in mine]
    path, reason = corpus.expected[case.name]
    assert mine[0].path == path  # the message names the series folder or the bad file
    assert reason in mine[0].reason
    assert str(mine[0]).startswith(path + ": ")


def test_good_series_load_and_counts_reconcile(corpus_run):
    corpus, refs, loaded, errors, _ = corpus_run
    assert len(loaded) == corpus.good
    assert {Path(s).name.removesuffix(".nii.gz") for s in loaded} == {
        "good_dicom_a",
        "good_dicom_b",
        "good_nifti",
        "junk_in_series_folder",
    }
    rejected_by_discover = len(errors) - (len(refs) - len(loaded))
    items_in = len(refs) + rejected_by_discover  # every file is in one ref or one reject
    assert items_in == len(loaded) + len(errors)
    assert len(errors) == len(VOLUME_CASES)  # one error per bad case, none for the good ones


def test_no_phi_in_volume_errors_logs_or_warnings(corpus_run):
    _, _, _, errors, logged = corpus_run
    assert errors
    for text in [str(err) for err in errors] + logged:
        _assert_no_phi(text)


def _label_errors(case, folder: Path) -> tuple[Path, list[DataError]]:
    path = case.write(folder)
    series = discover(folder)[0] if case.fmt == "rsna" else None
    try:
        table = load_labels(path, case.fmt, series=series)
    except DataError as err:
        return path, [err]
    return path, table.problems


@pytest.mark.parametrize("case", LABEL_CASES, ids=lambda c: c.name)
def test_each_bad_label_file_reports_its_problem(case, tmp_path):
    path, errors = _label_errors(case, tmp_path / case.name)
    assert len(errors) == 1, [str(e) for e in errors]
    error = errors[0]
    assert error.path == str(path)
    assert case.reason in error.reason
    if case.line is not None:
        assert error.reason.startswith(f"line {case.line}")
    _assert_no_phi(str(error))


def test_bad_label_rows_reject_their_study_only(tmp_path):
    case = next(c for c in LABEL_CASES if c.name == "generic_conflicting_duplicate")
    table = load_labels(case.write(tmp_path))
    assert set(table.rows) == {"s2"}
    with pytest.raises(DataError, match="conflicting labels") as info:
        table.for_study(("s1",), "some/series")
    assert info.value.path == "some/series"
