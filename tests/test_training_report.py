"""The per-epoch table: rows never share a terminal line with a progress bar; JSON per row; the plot."""

from __future__ import annotations

import io
import json
import re

from tqdm.auto import tqdm

from naics_hnm.train.evaluation_callback import TaxonomyEvaluationCallback
from naics_hnm.train.report import EpochTable, header_line, plot_history, row_line

ROW = {"epoch": 3, "phase": "2 mined", "mix": "0.40/0.40/0.20", "refresh": "0.4s", "train_loss": 0.5123,
       "ndcg@10": 0.91234, "cophenetic_pearson": 0.8, "heldout_ndcg@10": 0.77, "heldout_parent_hit": 0.6,
       "heldout_grandparent_hit": float("nan"), "epoch_s": 9.04, "mix_hard": 0.4, "mix_semi_hard": 0.4,
       "mix_easy": 0.2}


def _segments(text: str) -> list[str]:
    return [part for part in re.split(r"[\r\n]", text) if part.strip()]


def test_rows_get_their_own_line_while_a_bar_is_drawn(tmp_path):
    screen = io.StringIO()
    bar = tqdm(total=10, file=screen, mininterval=0, miniters=1, leave=True, desc="epoch 3")
    bar.update(4)
    table = EpochTable("mined", TaxonomyEvaluationCallback(), tmp_path, file=screen)
    table.add(dict(ROW))
    bar.update(1)  # the bar is drawn again on the line below the row, the cursor at its end
    table.add({**ROW, "epoch": 4})
    bar.update(1)
    bar.close()
    segments = _segments(screen.getvalue())
    # the header and both rows appear as whole terminal lines, not glued to the bar's text
    assert header_line() in segments
    assert row_line(ROW) in segments and row_line({**ROW, "epoch": 4}) in segments
    assert not any("epoch 3" in s and "mined" in s for s in segments)
    # the bar is redrawn after the rows (it keeps going below them)
    assert "epoch 3" in segments[-1]
    assert json.loads((tmp_path / "epoch_003.json").read_text())["ndcg@10"] == ROW["ndcg@10"]


def test_row_formatting_marks_missing_values():
    line = row_line({"epoch": 0, "phase": "random", "mix": "-", "refresh": "-", "train_loss": None,
                     "ndcg@10": 0.5, "cophenetic_pearson": 0.25, "epoch_s": 1.0})
    assert line.split()[:4] == ["0", "random", "-", "-"]
    assert " 0.500 " in line and line.count(" -") >= 5
    assert len(header_line()) == len(line)


def test_plot_shows_heldout_metrics_for_any_tree(tmp_path):
    rows = [{**ROW, "epoch": e, "heldout_ndcg@10": 0.5 + e / 20, "phase": "1 curriculum" if e < 2 else "2 mined"}
            for e in range(4)]
    plot_history(rows, tmp_path / "training.png", "a tree")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
