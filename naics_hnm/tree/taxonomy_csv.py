"""Reading a taxonomy CSV: header checks, UTF-8 errors and row errors that name the file and line.
:class:`TaxonomyError` lives here; :mod:`naics_hnm.tree.taxonomy` re-exports it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

REQUIRED_COLUMNS = ("code", "title")
OPTIONAL_COLUMNS = ("parent", "description", "examples", "excluded_codes")


class TaxonomyError(ValueError):
    """A taxonomy that cannot be built: names the offending row or code."""


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TaxonomyError(f"taxonomy CSV {str(path)!r} line {line}: byte {data[err.start]:#04x} is not "
                            "UTF-8; expected a UTF-8 text file") from None


def read_taxonomy_csv(path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """Rows as dicts keyed by the (stripped) header (short rows get empty trailing fields), and each row's line."""
    if not path.exists():
        raise TaxonomyError(f"taxonomy CSV {str(path)!r} does not exist")
    if not path.is_file():
        raise TaxonomyError(f"taxonomy CSV {str(path)!r} is not a file")
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TaxonomyError(f"taxonomy CSV {str(path)!r}: header {header} lacks column(s) {missing}")
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise TaxonomyError(f"taxonomy CSV {str(path)!r}: unknown column(s) {unknown}; expected "
                            f"{list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    if len(set(header)) != len(header):
        raise TaxonomyError(f"taxonomy CSV {str(path)!r}: header {header} repeats a column")
    records, lines = [], []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) > len(header):
            raise TaxonomyError(f"taxonomy CSV {str(path)!r} line {reader.line_num}: {len(row)} fields, more fields "
                                f"than the header's {len(header)}")
        records.append(dict(zip(header, row + [""] * (len(header) - len(row)))))  # short row: empty trailing fields
        lines.append(reader.line_num)
    if not records:
        raise TaxonomyError(f"taxonomy CSV {str(path)!r} has a header but no rows")
    return records, lines
