"""Label importers: the generic CSV, RSNA 2019 ICH and CQ500 reads, each mapped onto the 75-finding taxonomy.

Every importer returns a ``LabelTable``: per study key a ``LabelRow`` with ``labels`` and ``known`` (uint8[75],
in ``FINDING_IDS`` order). ``known[i] = 0`` means the source does not annotate finding ``i`` for that study: the
label is unknown, and loss and metrics mask it out (it is *not* a negative).

Formats (``fmt``):

- ``generic``: ``study_id, [patient_id,] <finding id>...`` with one 0/1 column per annotated finding (any subset
  of the 75; an empty or ``NA`` cell is unknown). This is what ``molre synth`` writes.
- ``rsna``: RSNA 2019 ICH ``stage_2_train.csv``, rows ``ID_<SOPInstanceUID>_<subtype>,Label``. Slice labels are
  OR-ed to the study through the DICOM headers (``series``: the refs from ``ingest.discover`` or a mapping
  SOPInstanceUID -> StudyInstanceUID); the study key is the StudyInstanceUID. Subtypes map as in
  ``RSNA_SUBTYPES``; RSNA's ``subdural`` covers every age of subdural blood but is mostly acute in an emergency
  cohort, so it maps to ``acute_subdural_hematoma`` and ``chronic_subdural_hematoma`` stays unknown; ``any`` is
  not a finding. The other 70 findings are unknown.
- ``cq500``: CQ500 ``reads.csv`` (``name, Category, R1:ICH, ..., R3:MidlineShift``); each mapped finding is the
  majority of readers R1-R3 (positive when >= 2 of 3 say 1). Mapping in ``CQ500_FINDINGS``: ``ChronicBleed`` ->
  ``chronic_subdural_hematoma`` (CQ500's chronic bleeds are chronic subdurals) and ``OtherFracture`` (any
  non-calvarial fracture) -> ``skull_base_fracture``, both approximations; ``ICH``, ``Fracture`` and
  ``BleedLocation-*`` are summaries with no single finding and are not used. The study key is ``name``
  (``CQ500-CT-0``); ``LabelTable`` also matches it to folder names written without punctuation
  (``CQ500CT0 CQ500CT0``, as the CQ500 download unpacks).

A bad row does not stop the import: it becomes a ``DataError`` in ``problems`` (its message names the file, the
line and the reason) and the study it belongs to is *rejected*: asking for that study's labels raises the
reason, so the study ends in quarantine. A file that cannot be keyed at all (unreadable, missing the study
column) raises ``DataError``. Patient ids are kept in ``LabelRow.patient_id`` only and never appear in a message.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molre.errors import DataError
from molre.findings import BY_ID, FINDING_IDS, NUM_FINDINGS

LABEL_FORMATS = ("generic", "rsna", "cq500")

RSNA_SUBTYPES: dict[str, str | None] = {
    "epidural": "epidural_hematoma",
    "intraparenchymal": "intraparenchymal_hemorrhage",
    "intraventricular": "intraventricular_hemorrhage",
    "subarachnoid": "subarachnoid_hemorrhage",
    "subdural": "acute_subdural_hematoma",
    "any": None,  # "any hemorrhage": a summary, not a finding
}
_RSNA_ID = re.compile(r"^ID_(?P<sop>[0-9A-Za-z.]+)_(?P<subtype>[a-z]+)$")

CQ500_READERS = ("R1", "R2", "R3")
CQ500_FINDINGS: dict[str, str] = {
    "IPH": "intraparenchymal_hemorrhage",
    "IVH": "intraventricular_hemorrhage",
    "SDH": "acute_subdural_hematoma",
    "EDH": "epidural_hematoma",
    "SAH": "subarachnoid_hemorrhage",
    "ChronicBleed": "chronic_subdural_hematoma",
    "CalvarialFracture": "skull_fracture",
    "OtherFracture": "skull_base_fracture",
    "MassEffect": "mass_effect",
    "MidlineShift": "midline_shift",
}

# the bad cells a message may quote: small numbers and common non-0/1 words ('2', '0.5', 'yes', 'maybe');
# anything else (a shifted column can put a name or an MRN where a 0/1 belongs) is shown by its length only
_SHOWABLE_CELL = re.compile(
    r"-?\d{1,2}(?:\.\d{1,3})?|true|false|yes|no|[ynt]|f|x|-|\?|na|n/a|nan|none|null|pos|neg|positive|negative"
    r"|maybe|unknown|present|absent",
    re.IGNORECASE,
)
# header cells a message may quote (a file without a header row puts a patient's row there)
_KNOWN_COLUMNS = frozenset(
    ["study_id", "patient_id", "ID", "Label", "name", "Category", *FINDING_IDS]
    + [f"{reader}:{code}" for reader in CQ500_READERS for code in [*CQ500_FINDINGS, "ICH", "Fracture"]]
)
_UNKNOWN_CELLS = {"", "na", "nan", "n/a", "none", "null"}  # generic format: these cells mean "not annotated"
_TRUE_FALSE = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


@dataclass
class LabelRow:
    labels: np.ndarray  # uint8[75]: 1 = finding present (meaningful only where known)
    known: np.ndarray  # uint8[75]: 1 = the source annotates this finding for this study
    patient_id: str | None = field(default=None, repr=False)  # from the label file, if it has one

    def same_as(self, other: LabelRow) -> bool:
        return (
            np.array_equal(self.labels, other.labels)
            and np.array_equal(self.known, other.known)
            and self.patient_id == other.patient_id
        )


def empty_row(patient_id: str | None = None) -> LabelRow:
    return LabelRow(np.zeros(NUM_FINDINGS, np.uint8), np.zeros(NUM_FINDINGS, np.uint8), patient_id)


@dataclass
class LabelTable:
    """Labels per study key, plus what was wrong with the file. See the module doc."""

    source: str  # the label file
    fmt: str
    rows: dict[str, LabelRow]
    problems: list[DataError] = field(default_factory=list)  # every bad row / column, for quarantine.csv
    rejected: dict[str, DataError] = field(default_factory=dict)  # study key -> why its labels are unusable
    _alias_cache: dict[str, str | None] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    def match(self, study_keys: Iterable[str]) -> str | None:
        """The table key for a study: the first of ``study_keys`` (most specific first) found exactly, else the
        first found after normalising (lower case, letters and digits only, each whitespace-separated token).
        Aliases are built on the first call: add no rows after it."""
        study_keys = [k for k in study_keys if k]
        for key in study_keys:
            if key in self.rows or key in self.rejected:
                return key
        aliases = self._aliases()
        for key in study_keys:
            for candidate in (key, *key.split()):
                found = aliases.get(_normalise(candidate))
                if found:
                    return found
        return None

    def lookup(self, study_keys: Iterable[str]) -> LabelRow | None:
        key = self.match(study_keys)
        return self.rows.get(key) if key is not None else None

    def for_study(self, study_keys: Iterable[str], source: str) -> LabelRow:
        """The study's labels, or a ``DataError`` naming ``source`` (the series) when it has none usable."""
        key = self.match(study_keys)
        if key is None:
            raise DataError(
                source, f"no label row in {self.source} matches this study (folder name, file stem or UID)"
            )
        if key in self.rejected:
            raise DataError(source, f"labels unusable: {self.rejected[key]}")
        return self.rows[key]

    def _aliases(self) -> dict[str, str | None]:
        # normalised key -> table key; two keys normalising alike are ambiguous (None): exact match only.
        # Keys without a letter (UIDs such as RSNA's) get no alias: "1.2.3" must never match a folder "123".
        if self._alias_cache is None:
            aliases: dict[str, str | None] = {}
            for key in (*self.rows, *self.rejected):
                norm = _normalise(key)
                if norm and any(c.isalpha() for c in norm):
                    aliases[norm] = None if norm in aliases and aliases[norm] != key else key
            self._alias_cache = aliases
        return self._alias_cache


def _normalise(key: str) -> str:
    return re.sub(r"[^0-9a-z]", "", key.lower())


def load_labels(
    path: str | Path,
    fmt: str = "generic",
    series: Sequence | Mapping[str, str] | None = None,
) -> LabelTable:
    """Read a label file of format ``fmt`` (one of ``LABEL_FORMATS``); ``series`` is needed for ``rsna`` only."""
    if fmt == "generic":
        return _load_generic(Path(path))
    if fmt == "rsna":
        return _load_rsna(Path(path), series)
    if fmt == "cq500":
        return _load_cq500(Path(path))
    raise ValueError(f"unknown labels format {fmt!r}; expected one of {LABEL_FORMATS}")


# ---------------------------------------------------------------------------------------------------- reading


def _read_csv(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header (stripped names) and (line number, cells) for every non-blank row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(str(path), "label file does not exist") from None
    except UnicodeDecodeError:
        raise DataError(str(path), "label file is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise DataError(str(path), "label file is empty (no header row)")
    header = [name.strip() for name in header]
    repeated = [i for i, name in enumerate(header) if header.index(name) != i]
    if repeated:
        first = header.index(header[repeated[0]])
        raise DataError(
            str(path),
            f"columns {first + 1} and {repeated[0] + 1} of the header have the same name"
            f"{_named(header[first])} (is the header row missing?)",
        )

    def rows() -> Iterator[tuple[int, list[str]]]:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield reader.line_num, [cell.strip() for cell in cells]

    return header, rows()


def _require(header: list[str], column: str, path: Path) -> int:
    if column not in header:
        known = [name for name in header if name in _KNOWN_COLUMNS]
        raise DataError(
            str(path),
            f"missing required column {column!r}: the first row has {len(header)} cells"
            + (
                f", known columns {known[:6]}"
                if known
                else ", none a column molre knows (is the header row missing?)"
            ),
        )
    return header.index(column)


def _named(name: str) -> str:
    """A header cell as messages may quote it: only the column names molre knows. The first row of a file without
    a header is a patient's row, so other cells are never quoted."""
    return f" {name!r}" if name in _KNOWN_COLUMNS else ""


def _binary(cell: str) -> int:
    """'0'/'1' (also '0.0'/'1.0') -> int; anything else is a ValueError."""
    if cell not in _TRUE_FALSE:
        raise ValueError(cell)
    return _TRUE_FALSE[cell]


def _shown(cell: str) -> str:
    """A bad cell as messages may show it: small numbers and common words as they are ('yes', '2', 'maybe'), others
    by length only: a shifted column can put a name or an id where a 0/1 belongs, and messages never quote PHI."""
    if _SHOWABLE_CELL.fullmatch(cell):
        return repr(cell)
    return f"of {len(cell)} {'digits' if cell.isdigit() else 'characters'}"


class _Collector:
    """Rows per study key; a key with a bad row or with conflicting rows ends up rejected, not labelled."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.rows: dict[str, tuple[int, LabelRow]] = {}
        self.problems: list[DataError] = []
        self.rejected: dict[str, DataError] = {}

    def bad(self, line: int, key: str | None, reason: str) -> None:
        # the line, not the study id: ids are often accession numbers, and quarantine.csv quotes this message
        error = DataError(str(self.path), f"line {line}: {reason}")
        self.problems.append(error)
        if key:
            self.rejected.setdefault(key, error)

    def add(self, line: int, key: str, row: LabelRow) -> None:
        if key in self.rows and not self.rows[key][1].same_as(row):
            self.bad(
                line, key, f"study id repeated with conflicting labels (first at line {self.rows[key][0]})"
            )
        self.rows.setdefault(key, (line, row))

    def table(self) -> LabelTable:
        rows = {key: row for key, (_, row) in self.rows.items() if key not in self.rejected}
        return LabelTable(str(self.path), self.fmt, rows, self.problems, self.rejected)


def _ragged(cells: list[str], header: list[str]) -> str | None:
    if len(cells) != len(header):
        return f"{len(cells)} fields where the header has {len(header)}; row skipped"
    return None


# ---------------------------------------------------------------------------------------------------- generic


def _load_generic(path: Path) -> LabelTable:
    header, records = _read_csv(path)
    study_col = _require(header, "study_id", path)
    patient_col = header.index("patient_id") if "patient_id" in header else None
    out = _Collector(path, "generic")
    finding_cols: dict[int, int] = {}  # csv column -> finding index
    for col, name in enumerate(header):
        if col in (study_col, patient_col):
            continue
        if name in BY_ID:
            finding_cols[col] = BY_ID[name].index
        else:
            out.problems.append(
                DataError(
                    str(path),
                    f"unknown finding column {name!r} (not one of the 75 ids in findings.yaml); ignored",
                )
            )
    for line, cells in records:
        key = cells[study_col] if study_col < len(cells) else ""
        if not key:
            out.bad(line, None, "empty study_id; row skipped")
            continue
        if reason := _ragged(cells, header):
            out.bad(line, key, reason)
            continue
        row = _generic_row(cells, finding_cols, cells[patient_col] if patient_col is not None else "")
        if isinstance(row, str):
            out.bad(line, key, row)
        else:
            out.add(line, key, row)
    return out.table()


def _generic_row(cells: list[str], finding_cols: dict[int, int], patient_id: str) -> LabelRow | str:
    """The row's labels, or the reason it is bad."""
    row = empty_row(patient_id or None)
    for col, index in finding_cols.items():
        cell = cells[col]
        if cell.lower() in _UNKNOWN_CELLS:
            continue
        try:
            row.labels[index] = _binary(cell)
        except ValueError:
            return f"value {_shown(cell)} for {FINDING_IDS[index]} is not 0 or 1"
        row.known[index] = 1
    return row


# ---------------------------------------------------------------------------------------------------- RSNA


def _load_rsna(path: Path, series) -> LabelTable:
    index = _sop_index(series, path)
    header, records = _read_csv(path)
    id_col, label_col = _require(header, "ID", path), _require(header, "Label", path)
    out = _Collector(path, "rsna")
    studies: dict[str, LabelRow] = {}
    first_line: dict[str, int] = {}
    unmatched, first_unmatched = 0, 0
    for line, cells in records:
        parsed = _RSNA_ID.match(cells[id_col]) if id_col < len(cells) else None
        if parsed is None or parsed["subtype"] not in RSNA_SUBTYPES:
            out.bad(
                line,
                None,
                f"malformed ID (expected ID_<SOPInstanceUID>_<subtype>, subtype one of {list(RSNA_SUBTYPES)})",
            )
            continue
        study = index.get("ID_" + parsed["sop"]) or index.get(
            parsed["sop"]
        )  # RSNA headers keep the ID_ prefix
        if study is None:
            unmatched, first_unmatched = unmatched + 1, first_unmatched or line
            continue
        cell = cells[label_col] if label_col < len(cells) else ""
        try:
            value = _binary(cell)
        except ValueError:
            out.bad(line, study, f"Label {_shown(cell)} is not 0 or 1")
            continue
        finding = RSNA_SUBTYPES[parsed["subtype"]]
        row = studies.setdefault(study, empty_row())
        first_line.setdefault(study, line)
        if finding is not None:
            i = BY_ID[finding].index
            row.labels[i] |= value  # study positive when any slice is (OR over slices)
            row.known[i] = 1
    for study, row in studies.items():
        out.add(first_line[study], study, row)
    if unmatched:
        out.problems.append(
            DataError(
                str(path),
                f"{unmatched} rows (first at line {first_unmatched}) name SOPInstanceUIDs not found in the DICOM "
                "headers; ignored",
            )
        )
    return out.table()


def _sop_index(series, path: Path) -> dict[str, str]:
    """SOPInstanceUID -> study key (StudyInstanceUID), from discover()'s refs or a ready mapping."""
    if series is None:
        raise DataError(
            str(path), "RSNA labels need the DICOM series (discover() refs) to map slices to studies"
        )
    if isinstance(series, Mapping):
        return {str(k): str(v) for k, v in series.items()}
    index: dict[str, str] = {}
    for ref in series:
        study = ref.study_uid or (ref.study_keys[-1] if ref.study_keys else "")
        for sop in ref.sop_uids:
            index[sop] = study
    return index


# ---------------------------------------------------------------------------------------------------- CQ500


def _load_cq500(path: Path) -> LabelTable:
    header, records = _read_csv(path)
    name_col = _require(header, "name", path)
    out = _Collector(path, "cq500")
    readers: dict[int, list[int]] = {}  # finding index -> csv columns of R1..R3
    for code, finding in CQ500_FINDINGS.items():
        columns = [f"{reader}:{code}" for reader in CQ500_READERS]
        missing = [c for c in columns if c not in header]
        if missing:
            out.problems.append(
                DataError(
                    str(path),
                    f"missing reader column {', '.join(missing)}: {finding} left unknown for every study",
                )
            )
        else:
            readers[BY_ID[finding].index] = [header.index(c) for c in columns]
    for line, cells in records:
        key = cells[name_col] if name_col < len(cells) else ""
        if not key:
            out.bad(line, None, "empty name; row skipped")
            continue
        if reason := _ragged(cells, header):
            out.bad(line, key, reason)
            continue
        row = _cq500_row(cells, readers, header)
        if isinstance(row, str):
            out.bad(line, key, row)
        else:
            out.add(line, key, row)
    return out.table()


def _cq500_row(cells: list[str], readers: dict[int, list[int]], header: list[str]) -> LabelRow | str:
    row = empty_row()
    for index, columns in readers.items():
        votes = 0
        for col in columns:
            try:
                votes += _binary(cells[col])
            except ValueError:
                return f"value {_shown(cells[col])} in column {header[col]!r} is not 0 or 1"
        row.labels[index] = votes * 2 > len(columns)  # majority: at least 2 of 3 readers
        row.known[index] = 1
    return row
