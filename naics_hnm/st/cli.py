"""Mine hard negatives for a file of (anchor, positive) text pairs: ``python -m naics_hnm.mine --help``.

Reads and writes ``.jsonl``, ``.csv`` (list cells as JSON) and ``.parquet``, mining with
:func:`naics_hnm.mine_hard_negatives` and writing its dataset card beside the output; runs under
``torchrun`` too (:mod:`naics_hnm.st.distributed_mining`). Bad input ends with one line on stderr
and exit status 2; the output is written to a temporary file and moved into place."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from naics_hnm.atomic import atomic_path

PROG = "python -m naics_hnm.mine"
FORMATS = (".jsonl", ".csv", ".parquet")


class CliError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("files")
    io.add_argument("--dataset", required=True, type=Path, help="(anchor, positive) pairs: .jsonl, .csv or .parquet")
    io.add_argument("--model", required=True, help="SentenceTransformer folder (or name, when the hub is reachable)")
    io.add_argument("--cross-encoder", help="CrossEncoder folder (or name) that rescores candidates and positives")
    io.add_argument("--output", required=True, type=Path, help="where to write: .jsonl, .csv or .parquet")
    io.add_argument("--corpus", type=Path, help="extra candidate texts: .txt (one per line), .jsonl, .csv or .parquet")
    io.add_argument("--corpus-column", help="the text column of a tabular --corpus (default: 'text' or the first)")
    io.add_argument("--anchor-column", help="anchor column (default: the first)")
    io.add_argument("--positive-column", help="positive column (default: the second)")
    m = p.add_argument_group("mining (as sentence_transformers.util.mine_hard_negatives)")
    m.add_argument("--num-negatives", type=int, default=3)
    m.add_argument("--range-min", type=int, default=0, help="skip this many valid candidates")
    m.add_argument("--range-max", type=int, help="rank bound of random sampling (default as sentence-transformers)")
    for flag in ("--max-score", "--min-score", "--absolute-margin", "--relative-margin"):
        m.add_argument(flag, type=float)
    m.add_argument("--sampling-strategy", choices=("top", "random"), default="top")
    m.add_argument("--seed", type=int, default=0, help="key of the random draws")
    for flag in ("--query-prompt", "--query-prompt-name", "--corpus-prompt", "--corpus-prompt-name"):
        m.add_argument(flag)
    m.add_argument("--include-positives", action="store_true")
    m.add_argument("--output-format", choices=("triplet", "n-tuple", "labeled-pair", "labeled-list"), default="triplet")
    m.add_argument("--output-scores", action="store_true")
    m.add_argument("--batch-size", type=int, default=32, help="texts per model call")
    m.add_argument("--cache-folder", help="cache embeddings here")
    t = p.add_argument_group("tree guard and index")
    t.add_argument("--taxonomy", type=Path, help="taxonomy CSV (code,title[,parent]): texts stand for codes")
    t.add_argument("--codes", type=Path, help="CSV with text,code rows, for texts that are not titles")
    t.add_argument("--order-filter", action="store_true", help="also drop texts as near in the tree as a positive")
    t.add_argument("--index-factory", help="faiss factory string for an approximate index, e.g. IVF4096,Flat")
    t.add_argument("--search-params", help="JSON search parameters, e.g. '{\"nprobe\": 64}'")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the index lives")
    t.add_argument("--model-device", help="where the model runs (default: the model's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        launcher = PROG.split()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            launcher = ["torchrun", "--nproc-per-node", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]),
                        *launcher[1:]]
        args.command = shlex.join([*launcher, *(sys.argv[1:] if argv is None else argv)])
        status = _run(args)
        _leave_process_group(finished=True)
        return status
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group(*, finished: bool = False) -> None:
    if "naics_hnm.st.distributed_mining" in sys.modules:
        sys.modules["naics_hnm.st.distributed_mining"].leave_process_group(finished=finished)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("naics_hnm.st.hard_negatives").setLevel(logging.ERROR)  # the summary below says it
    if args.output.is_dir():
        raise CliError(f"--output {str(args.output)!r} is a folder; expected a file path")
    if args.output.suffix not in FORMATS:
        raise CliError(f"--output {str(args.output)!r}: expected a file ending in {', '.join(FORMATS)}")
    existing = next(p for p in (args.output.parent.absolute(), *args.output.parent.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--output {str(args.output)!r}: {str(existing)!r} is "
                       f"{'a file' if not existing.is_dir() else 'not writable'}, expected a writable folder")
    dataset = read_table(args.dataset, "--dataset")
    corpus = read_corpus(args.corpus, args.corpus_column) if args.corpus else None
    codes = read_codes(args.codes) if args.codes else None
    search_params = _json_option(args.search_params, "--search-params") if args.search_params else None
    taxonomy = _taxonomy(args.taxonomy) if args.taxonomy else None
    from naics_hnm.st.distributed_mining import process_group_shard
    shard = process_group_shard()
    writer = shard is None or shard.rank == 0
    if args.model_device is None and shard is not None and shard.world_size > 1:
        import torch
        if torch.cuda.is_available():  # one GPU per rank
            args.model_device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    from naics_hnm.st.hard_negatives import check_options, mine_with_report
    from naics_hnm.st.text_corpus import resolve_columns
    given = {"anchor_column_name": args.anchor_column, "positive_column_name": args.positive_column,
             "corpus": corpus, "taxonomy": taxonomy, "codes": codes, "search_params": search_params}
    options = {name: given[name] if name in given else getattr(args, name) for name in PARAMETERS}
    options["verbose"] = writer and not args.quiet
    try:
        check_options(**options)  # numbers and names before any model loads
        resolve_columns(dataset, args.anchor_column, args.positive_column)
    except (ValueError, TypeError, KeyError) as exc:
        raise CliError(_flag_message(exc)) from None
    if args.quiet:  # no loading bars or notes from transformers either
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    model = _load("SentenceTransformer", "--model", args.model, args.model_device)
    if args.cross_encoder:
        options["cross_encoder"] = _load("CrossEncoder", "--cross-encoder", args.cross_encoder, args.model_device)
    start = time.perf_counter()
    try:
        columns, report = mine_with_report(dataset, model, shard=shard, **options)
    except (ValueError, TypeError, KeyError) as exc:
        raise CliError(_flag_message(exc)) from None
    if not writer:
        return 0
    write_table(args.output, columns)
    from naics_hnm.st.dataset_card import write_dataset_card
    try:
        card = write_dataset_card(report.card(args.command), args.output)
    except OSError as exc:
        raise CliError(f"--output {str(args.output)!r}: the dataset card could not be written: "
                       f"{exc.strerror or exc}") from None
    if not args.quiet:
        _summary(report, args, time.perf_counter() - start, card)
    return 0


def _summary(report: Any, args: argparse.Namespace, seconds: float, card: Path) -> None:
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    print(f"mined {report.rows_out:,} {args.output_format} rows from {report.rows_in:,} input rows in "
          f"{seconds:.1f}s ({steps})")
    print(f"  {report.anchors:,} distinct anchors, {report.corpus_texts:,} distinct corpus texts, "
          f"{report.texts_embedded:,} texts embedded; {args.num_negatives} negatives per anchor: " + (
              f"valid ranks {args.range_min}-{args.range_min + args.num_negatives - 1}"
              if args.sampling_strategy == "top" else
              f"drawn from valid ranks {args.range_min}-{report.range_max - 1} with seed {report.seed}"))
    if report.pairs_rescored:
        print(f"  cross-encoder {args.cross_encoder}: {report.pairs_rescored:,} distinct (anchor, text) pairs scored; "
              "scores and rules are its scores")
    print(f"  short rows: {report.short_rows:,}" + (f" - {report.short_message()}" if report.short_anchors else
                                                    f" (every anchor has {args.num_negatives} negatives)"))
    for line in report.score_table():
        print(f"  {line}")
    print(f"wrote {args.output} and its dataset card {card}")


# mine_hard_negatives' parameters that the CLI sets from a flag of its own; FLAGS: those not named --name-with-dashes
FLAGS = {"anchor_column_name": "--anchor-column", "positive_column_name": "--positive-column",
         "verbose": "--quiet", "corpus": "--corpus"}
PARAMETERS = ("anchor_column_name", "positive_column_name", "corpus", "range_min", "range_max", "max_score",
              "min_score", "absolute_margin", "relative_margin", "num_negatives", "sampling_strategy",
              "query_prompt_name", "query_prompt", "corpus_prompt_name", "corpus_prompt", "include_positives",
              "output_format", "output_scores", "batch_size", "cache_folder", "seed", "taxonomy", "codes",
              "order_filter", "index_factory", "search_params", "device")


def _flag_message(exc: BaseException) -> str:
    """The error in one line, led by the flags of the parameters it names (``num_negatives=0`` -> --num-negatives)."""
    text = _one_line(exc)
    # snake_case names, or any name before '='
    named = [name for name in re.findall(r"\b([a-z]+_[a-z_]+|[a-z]+(?==))", text) if name in PARAMETERS]
    flags = list(dict.fromkeys(FLAGS.get(name, "--" + name.replace("_", "-")) for name in named))
    return f"{', '.join(flags)}: {text}" if flags else text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"") or type(exc).__name__
    return " ".join(text.split())


def read_table(path: Path, option: str) -> dict[str, list]:
    """Columns of a .jsonl, .csv or .parquet file; CliError naming the file (and line) on bad input."""
    if not path.is_file():
        raise CliError(f"{option} {str(path)!r}: no such file")
    read = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}.get(path.suffix)
    if read is None:
        raise CliError(f"{option} {str(path)!r}: expected a file ending in {', '.join(FORMATS)}")
    try:
        columns = read(path, option)
    except UnicodeDecodeError as exc:
        raise CliError(f"{option} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CliError(f"{option} {str(path)!r}: {exc.strerror or exc}") from None
    if not columns or not next(iter(columns.values())):
        raise CliError(f"{option} {str(path)!r} holds no rows; expected (anchor, positive) rows")
    return columns


def _read_jsonl(path: Path, option: str) -> dict[str, list]:
    columns: dict[str, list] = {}
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CliError(f"{option} {str(path)!r} line {line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise CliError(f"{option} {str(path)!r} line {line_no}: expected a JSON object, "
                               f"got {type(record).__name__}")
            for key in record:
                if key not in columns:
                    columns[key] = [None] * rows
            for key, values in columns.items():
                values.append(record.get(key))
            rows += 1
    return columns


def _read_csv(path: Path, option: str) -> dict[str, list]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise CliError(f"{option} {str(path)!r} is empty; expected a header row and (anchor, positive) rows")
        columns: dict[str, list] = {name: [] for name in header}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise CliError(f"{option} {str(path)!r} line {reader.line_num}: {len(row)} fields, expected "
                               f"{len(header)} (the header's)")
            for name, value in zip(header, row):
                columns[name].append(value)
    return columns


def _read_parquet(path: Path, option: str) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CliError(f"{option} {str(path)!r}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pydict()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CliError(f"{option} {str(path)!r}: not a readable parquet file ({_one_line(exc)})") from None


def read_corpus(path: Path, column: str | None) -> list[str]:
    if path.suffix == ".txt":
        if not path.is_file():
            raise CliError(f"--corpus {str(path)!r}: no such file")
        try:
            return [line.rstrip("\r\n") for line in path.open(encoding="utf-8") if line.strip()]
        except UnicodeDecodeError:
            raise CliError(f"--corpus {str(path)!r} is not UTF-8 text") from None
    table = read_table(path, "--corpus")
    name = column or ("text" if "text" in table else next(iter(table)))
    if name not in table:
        raise CliError(f"--corpus-column {name!r} is not a column of {str(path)!r}; its columns are {list(table)}")
    return table[name]


def read_codes(path: Path) -> dict[str, list[str]]:
    table = read_table(path, "--codes")
    if "text" not in table or "code" not in table:
        raise CliError(f"--codes {str(path)!r}: expected columns text and code, got {list(table)}")
    codes: dict[str, list[str]] = {}
    for text, code in zip(table["text"], table["code"]):
        codes.setdefault(str(text), []).append(str(code))
    return codes


def write_table(path: Path, columns: dict[str, list]) -> None:
    """Write the columns atomically: the file is complete or the previous one is untouched."""
    try:
        with atomic_path(path) as temp:
            if path.suffix == ".parquet":
                try:
                    import pyarrow as pa
                    import pyarrow.parquet as pq
                except ImportError:
                    raise CliError("writing .parquet needs pyarrow (pip install pyarrow)") from None
                pq.write_table(pa.Table.from_pydict(columns), temp)
                return
            with temp.open("w", encoding="utf-8", newline="") as handle:
                names, rows = list(columns), zip(*columns.values())
                if path.suffix == ".jsonl":
                    for row in rows:
                        handle.write(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n")
                else:
                    writer = csv.writer(handle)
                    writer.writerow(names)
                    writer.writerows([json.dumps(v) if isinstance(v, list) else v for v in row] for row in rows)
    except OSError as exc:
        raise CliError(f"--output {str(path)!r}: {exc.strerror or exc}") from None


def _load(class_name: str, option: str, name: str, device: str | None) -> Any:
    """A sentence-transformers model class loaded from ``name``; CliError naming ``option`` when it fails."""
    try:
        import sentence_transformers
    except ImportError:
        raise CliError(f"{option} needs sentence-transformers (pip install sentence-transformers)") from None
    if not Path(name).exists() and Path(name).is_absolute():
        raise CliError(f"{option} {name!r}: no such folder")
    try:
        return getattr(sentence_transformers, class_name)(name, device=device)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's model argument
        raise CliError(f"{option} {name!r} could not be loaded as a {class_name}: {_one_line(exc)}") from None


def _taxonomy(path: Path) -> Any:
    from naics_hnm.tree.taxonomy import Taxonomy
    if not path.is_file():
        raise CliError(f"--taxonomy {str(path)!r}: no such file")
    try:
        return Taxonomy.from_csv(path)
    except (ValueError, OSError) as exc:
        raise CliError(f"--taxonomy: {_one_line(exc)}") from None


def _json_option(text: str, option: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option} {text!r}: invalid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise CliError(f"{option} {text!r}: expected a JSON object such as {{\"nprobe\": 64}}")
    return value

