"""bench_scale's report: one size's stage lines, the table across sizes and the target lines."""

from __future__ import annotations

import math
from typing import Any

TARGETS = {"phase1_vs_ref": 10.0, "mine_vs_small": 1.5, "phase1_small_vs_large": 2.0, "peak_rss_gib": 6.0,
           "refresh_minutes": 2.0, "recall": 0.95, "user_minutes": 5.0, "main_job_minutes": 30.0}
"""At the largest size: refresh at the defaults <= 2 min with recall@64 >= 0.95, what a user runs (load +
datamodule + refresh) <= 5 min, <= 6 GiB; per-batch mining (1 thread) <= 1.5x and Phase 1 items/s
within 2x of the small fixture, same run; Phase 1 >= 10x the straightforward reference; with --main-job,
the main job end to end (one-off encoder pass included) <= 30 min."""


def _get(res: dict, stage: str, key: str, default: Any = None) -> Any:
    return (res.get("stages", {}).get(stage) or {}).get(key, default)


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def print_size(res: dict) -> None:
    n = res.get("n")
    print(f"\n--- N = {n:,} codes: total {res.get('total_seconds', float('nan')):.1f} s, peak RSS "
          f"{res.get('peak_rss_mib', float('nan')):,.0f} MiB")
    su = res.get("setup_untimed")
    if su:
        print(f"  (untimed) synthetic_tree {su['synthetic_tree_s']:.2f} s, write CSV {su['write_csv_s']:.2f} s "
              f"({su['csv_mib']:.1f} MiB)")
    print(f"  {'stage':<14} {'seconds':>9} {'RSS MiB':>9} {'peak MiB':>9} {'load':>5}  details")
    for name, st in res.get("stages", {}).items():
        details = {k: v for k, v in st.items() if k not in ("seconds", "rss_mib", "peak_rss_mib", "load_avg")}
        text = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
        print(f"  {name:<14} {st['seconds']:>9.2f} {st['rss_mib']:>9,.0f} {st['peak_rss_mib']:>9,.0f} "
              f"{st.get('load_avg', float('nan')):>5.1f}  {text}")
    for name, err in res.get("errors", {}).items():
        print(f"  ERROR {name}: {err}")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


COLUMNS = ["N", "load s", "prep s", "setup s", "P1 items/s", "P1/ref", "P1 2k/N same run", "default index (params)",
           "refresh s (build + lists)", "recall@64", "flat refresh s", "mine ms 1 thread", "mine N/2k same run, 1 thread",
           "user path min", "total s", "peak RSS GiB", "load avg", "checks", "errors"]


def user_seconds(r: dict) -> float | None:
    """What a user runs: load + datamodule + the default refresh."""
    parts = [_get(r, s, "seconds") for s in ("load", "datamodule", "refresh_default")]
    return sum(parts) if all(p is not None for p in parts) else None


def _checks(r: dict) -> str:
    bad = sum((_get(r, s, "check") or {}).get("invalid", 0) for s in ("phase1", "mining"))
    bad += (_get(r, "phase1", "check_reference") or {}).get("invalid", 0)
    bad += _get(r, "recall", "default_invalid", 0) or 0
    brute = _get(r, "refresh_flat", "brute_force_rows_equal")
    return f"{bad} invalid" + (f", brute {brute}" if brute else "")


def _flat_text(r: dict) -> str:
    flat = _get(r, "refresh_flat", "refresh_s")
    if not _get(r, "refresh_flat", "neighbours_extrapolated"):
        return _fmt(flat, ".1f")
    return (f"~{flat:.0f} (extrapolated from {_get(r, 'refresh_flat', 'neighbours_measured_s'):.1f} s on "
            f"{_get(r, 'refresh_flat', 'neighbours_anchors'):,} anchors)")


def summary_row(r: dict) -> list[str]:
    p1 = _get(r, "phase1", "items_per_s")
    mine1 = _get(r, "mining", "mine_ms_1thread")
    params = _get(r, "refresh_default", "search_params") or {}
    index = _get(r, "refresh_default", "factory")
    user = user_seconds(r)
    loads = [st.get("load_avg") for st in r.get("stages", {}).values() if st.get("load_avg") is not None]
    return [f"{r['n']:,}", _fmt(_get(r, "load", "seconds"), ".2f"), _fmt(_get(r, "datamodule", "prepare_s"), ".2f"),
            _fmt(_get(r, "datamodule", "setup_s"), ".2f"), _fmt(p1, ",.0f"),
            _fmt(_get(r, "phase1", "ratio_vs_reference"), ",.0f") + ("x" if p1 else ""),
            _fmt(_get(r, "phase1", "small_over_n_same_run"), ".2f") + "x",
            f"{index} {params}" if index else "-",
            (f"{_get(r, 'refresh_default', 'refresh_s'):.1f} ({_get(r, 'refresh_default', 'build_s'):.1f} + "
             f"{_get(r, 'refresh_default', 'neighbours_s'):.1f})") if index else "-",
            _fmt(_get(r, "recall", "recall_at_64"), ".3f"), _flat_text(r),
            _fmt(mine1, ".1f"), _fmt(_get(r, "mining", "n_over_small_same_run_1thread"), ".2f") + "x",
            _fmt(user / 60 if user else None, ".1f"), _fmt(r.get("total_seconds"), ".0f"),
            _fmt(r.get("peak_rss_mib", 0) / 1024, ".2f"),
            f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-", _checks(r),
            "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items()) or "-"]


NOTES = ("P1 items/s: mean of epoch 0 and the last Phase 1 epoch, getitems + collate, batch 256; P1/ref: ours / "
         "the straightforward per-item reference, interleaved. 'same run': each child also builds the pipeline at "
         "--small-size codes and times its batches interleaved with N's (ratio N-cost / 2k-cost, robust to load "
         "from other jobs). default index: what HardNegativeMiner chooses from N (naics_hnm.index.auto); recall@64: "
         "its guarded neighbour lists against exact flat lists. flat refresh above --flat-exact-max is an "
         "extrapolation from a sampled pass (labelled). mine ms: median per batch of 256 of miner.mine (widen + "
         "guard + rank) with torch.set_num_threads(1). user path: load + datamodule + default refresh.")


def _verdict(lines: list[str], name: str, value: float | None, target: float, fmt: str, less: bool = True) -> None:
    sign = "<=" if less else ">="
    if value is None:
        lines.append(f"  {name:<66} {'-':>8}  target {sign} {target:g}  n/a")
        return
    good = value <= target if less else value >= target
    lines.append(f"  {name:<66} {format(value, fmt):>8}  target {sign} {target:g}  {'pass' if good else 'FAIL'}")


def target_lines(ok: list[dict]) -> list[str]:
    big = max(ok, key=lambda r: r["n"])
    n, lines = big["n"], [f"\ntargets (largest N={big['n']:,}):"]
    small_n = _get(big, "phase1", "small_n") or _get(big, "small_fixture", "n") or 0
    ratios = [x for x in (_get(r, "phase1", "ratio_vs_reference") for r in ok) if x]
    _verdict(lines, "Phase 1 ours / straightforward, worst size (x)", min(ratios, default=None),
             TARGETS["phase1_vs_ref"], ".1f", less=False)
    _verdict(lines, f"Phase 1 items/s {small_n:,} / {n:,} codes, same run (x)",
             _get(big, "phase1", "small_over_n_same_run"), TARGETS["phase1_small_vs_large"], ".2f")
    _verdict(lines, f"mining ms/batch {n:,} / {small_n:,}, same run, 1 thread, median (x)",
             _get(big, "mining", "n_over_small_same_run_1thread"), TARGETS["mine_vs_small"], ".2f")
    refresh = _get(big, "refresh_default", "refresh_s")
    _verdict(lines, f"refresh at the defaults, {n:,} codes (minutes)", refresh / 60 if refresh else None,
             TARGETS["refresh_minutes"], ".2f")
    recalls = [x for x in (_get(r, "recall", "recall_at_64") for r in ok) if x is not None]
    _verdict(lines, "recall@64 of the default lists vs exact, worst size", min(recalls, default=None),
             TARGETS["recall"], ".3f", less=False)
    user = user_seconds(big)
    _verdict(lines, f"user path (load + datamodule + refresh), {n:,} codes (minutes)", user / 60 if user else None,
             TARGETS["user_minutes"], ".1f")
    _verdict(lines, "peak RSS of the largest size (GiB)", big.get("peak_rss_mib", 0) / 1024,
             TARGETS["peak_rss_gib"], ".2f")
    if "main_job" in big.get("stages", {}):
        _verdict(lines, f"main job end to end (train_naics.py defaults), {n:,} codes (minutes)",
                 _get(big, "main_job", "minutes"), TARGETS["main_job_minutes"], ".1f")
    return lines


def summary(results: list[dict]) -> list[str]:
    """The table across sizes, the notes and the target lines; returns the lines printed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(summary_row(r)) + " |" for r in results]
    lines += ["", NOTES]
    ok = [r for r in results if r.get("stages")]
    return lines + (target_lines(ok) if ok else [])
