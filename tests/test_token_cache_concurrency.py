"""Token cache writes under kill -9 and concurrent processes; stale temporary files of atomic writes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from naics_hnm.atomic import STALE_AFTER_S, atomic_write_text, remove_stale_temp_files
from naics_hnm.data.token_cache import build_token_cache, ensure_token_cache, load_token_cache

CODES = [f"{1000 + i}" for i in range(40)]
TEXTS = [f"Code {i}: farming of crop {i}" + f" and {i * 7} widgets" * (i % 4) for i in range(40)]
ROOT = Path(__file__).resolve().parents[1]

# Runs build_token_cache(path, ...) and SIGKILLs itself at one step of the write.
KILLED_BUILD = textwrap.dedent("""
    import json, os, signal, sys
    from naics_hnm import atomic
    from naics_hnm.data.token_cache import build_token_cache, ensure_token_cache, load_tokenizer

    target, step, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    codes, texts = json.loads(sys.stdin.read())
    real_open, real_replace = open, os.replace

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    class HalfWrite:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.handle.close()
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            die()

    def replace_then_die(*args):
        real_replace(*args)
        die()

    if step == "temp_created":
        atomic.open = die
    elif step == "half_written":
        atomic.open = lambda path, mode: HalfWrite(real_open(path, mode))
    elif step == "written":
        os.replace = die
    elif step == "replaced":
        os.replace = replace_then_die
    tokenizer = load_tokenizer()
    if step.startswith("ensure"):
        os.replace = die
        ensure_token_cache(target, "tiny", codes, texts, tokenizer, max_length)
    else:
        build_token_cache(target, codes, texts, tokenizer, max_length)
    sys.exit("the build finished: the step was never reached")
""")


def _run_killed(target, step, max_length):
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(target), step, str(max_length)],
                          input=json.dumps([CODES, TEXTS]), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _temp_files(folder):
    return sorted(p.name for p in Path(folder).glob(".*.tmp"))


@pytest.mark.parametrize("step", ["temp_created", "half_written", "written", "replaced"])
def test_kill_9_during_a_build_keeps_the_previous_cache(tokenizer, tmp_path, step, caplog):
    path = tmp_path / "tokens.h5"
    previous_fp = build_token_cache(path, CODES, TEXTS, tokenizer, 16)
    previous = path.read_bytes()
    _run_killed(path, step, 8)
    orphans = _temp_files(tmp_path)
    if step == "replaced":  # the new cache arrived whole
        assert orphans == []
        assert load_token_cache(path).input_ids.shape[1] == 8
        return
    assert path.read_bytes() == previous
    assert load_token_cache(path, previous_fp, expected_codes=CODES).size == len(CODES)
    assert len(orphans) == 1 and orphans[0].startswith(".tokens.h5.")
    with caplog.at_level(logging.WARNING, logger="naics_hnm.atomic"):
        build_token_cache(path, CODES, TEXTS, tokenizer, 8)
    assert _temp_files(tmp_path) == [] and f"removed {orphans[0]}" in caplog.text
    assert load_token_cache(path).input_ids.shape[1] == 8


def test_kill_9_while_holding_the_build_lock(tokenizer, tmp_path):
    _run_killed(tmp_path, "ensure", 16)
    assert len(_temp_files(tmp_path)) == 1
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 16)  # the lock died with its holder
    assert _temp_files(tmp_path) == []
    assert load_token_cache(path, fp, expected_codes=CODES).size == len(CODES)


# Serves ensure_token_cache requests, one JSON line each, starting at a given wall-clock time.
WORKER = textwrap.dedent("""
    import json, os, sys, time
    from naics_hnm.data import token_cache

    builds = 0
    real_build = token_cache.build_token_cache

    def counting_build(*args, **kwargs):
        global builds
        builds += 1
        return real_build(*args, **kwargs)

    token_cache.build_token_cache = counting_build
    codes, texts = json.loads(sys.stdin.readline())
    tokenizer = token_cache.load_tokenizer()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        time.sleep(max(0.0, request["start_at"] - time.time()))
        builds = 0
        path, fp = token_cache.ensure_token_cache(request["cache_dir"], "tiny", codes, texts, tokenizer,
                                                  request["max_length"])
        token_cache.load_token_cache(path, fp, expected_codes=codes)
        print(json.dumps({"path": str(path), "fingerprint": fp, "builds": builds}), flush=True)
""")


@pytest.fixture
def workers():
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    for proc in procs:
        proc.stdin.write(json.dumps([CODES, TEXTS]) + "\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout.readline() == "ready\n"
    yield procs
    for proc in procs:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def _together(workers, cache_dir, max_lengths):
    """Both workers call ensure_token_cache at the same moment; their answers."""
    start_at = time.time() + 0.5
    for proc, max_length in zip(workers, max_lengths):
        proc.stdin.write(json.dumps({"cache_dir": str(cache_dir), "max_length": max_length,
                                     "start_at": start_at}) + "\n")
        proc.stdin.flush()
    return [json.loads(proc.stdout.readline()) for proc in workers]


def test_two_processes_ensure_the_same_cache_together(tmp_path, workers):
    for round_ in range(4):
        cache_dir = tmp_path / f"round{round_}"
        first, second = _together(workers, cache_dir, [16, 16])
        assert first["path"] == second["path"] and first["fingerprint"] == second["fingerprint"]
        assert first["builds"] + second["builds"] == 1
        path = Path(first["path"])
        assert sorted(p.name for p in cache_dir.iterdir()) == [path.name, f"{path.name}.lock"]
        load_token_cache(path, first["fingerprint"], expected_codes=CODES)


def test_two_processes_with_other_settings_share_a_cache_dir(tmp_path, workers):
    first, second = _together(workers, tmp_path, [16, 8])
    assert first["path"] != second["path"] and first["builds"] == second["builds"] == 1
    for answer in (first, second):
        load_token_cache(answer["path"], answer["fingerprint"], expected_codes=CODES)
    assert _temp_files(tmp_path) == []


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_stale_temp_files_of_the_target_are_removed(tmp_path):
    target = tmp_path / "data.json"
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    names = {
        "dead_writer": f".data.json.{host}.{_dead_pid()}.0123abcd.tmp",
        "live_writer": f".data.json.{host}.{os.getpid()}.0123abcd.tmp",
        "other_host_recent": f".data.json.elsewhere.{_dead_pid()}.0123abcd.tmp",
        "other_host_old": ".data.json.elsewhere.1.89abcdef.tmp",
        "earlier_version_old": ".data.json.k3_x9a0q.tmp",
        "earlier_version_recent": ".data.json.zzzzzzzz.tmp",
        "other_target": f".other.json.{host}.{_dead_pid()}.0123abcd.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("partial")
    long_ago = time.time() - STALE_AFTER_S - 60
    for key in ("other_host_old", "earlier_version_old"):
        os.utime(tmp_path / names[key], (long_ago, long_ago))
    removed = remove_stale_temp_files(target)
    assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead_writer", "other_host_old",
                                                                          "earlier_version_old"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("live_writer", "other_host_recent", "earlier_version_recent", "other_target"))
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
