"""Result folders are written atomically and interrupted runs leave nothing behind: a
SIGTERM in analyze's write phase or a full disk leaves the folder exactly as it was, the
next run's folder lists exactly its own files, and a killed sweep leaves no process."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bench.helpers import run_cli as run
from gradood.analyze import output
from gradood.store.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORES = ["--score", "msp", "--score", "energy", "--score", "maxlogit", "--score", "knn"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syn")
    write_synthetic(str(folder / "syn_train.h5"), 300, num_classes=5, dim=8, seed=1, split="train")
    write_synthetic(str(folder / "syn.h5"), 100, num_classes=5, dim=8, seed=2)
    write_synthetic(str(folder / "far.h5"), 60, num_classes=5, dim=8, seed=3, novel=1.0)
    write_synthetic(str(folder / "near.h5"), 60, num_classes=5, dim=8, seed=4, novel=0.5)
    return str(folder)


def snapshot(folder):
    """{relative path: bytes} of every result file under ``folder`` (fitted attributes,
    a cache of the fits, left out)."""
    files = {}
    for where, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "fitted"]
        for n in names:
            path = os.path.join(where, n)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def assert_lists_exactly_its_own_files(folder):
    """Every entry of the folder (besides fitted/ and previous/) is in results.json's list."""
    with open(os.path.join(folder, "results.json")) as f:
        listed = set(json.load(f)["files"]) | {"results.json"}
    assert set(os.listdir(folder)) - {"fitted", "previous"} == listed
    siblings = os.listdir(os.path.dirname(folder))
    assert not [s for s in siblings if ".writing-" in s], siblings


def test_sigterm_in_the_write_phase_leaves_the_folder_as_it_was(caches, tmp_path):
    out = str(tmp_path / "r")
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", *SCORES, "--results", out])
    assert code == 0, text
    before = snapshot(out)
    marker = tmp_path / "writing"
    # a real SIGTERM, sent while the run is between its 3rd and 4th table file
    script = (
        "import sys, time\n"
        "from gradood.analyze import output\n"
        "from gradood.pipeline import cli\n"
        "real, count = output.write_csv, [0]\n"
        "def slow(*a):\n"
        "    real(*a)\n"
        "    count[0] += 1\n"
        "    if count[0] == 3:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        time.sleep(60)\n"
        "output.write_csv = slow\n"
        f"cli(['analyze', '--cache-dir', {caches!r}, '--id', 'syn', '--score', 'all', '--results', {out!r}])\n")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "left as it was" in err and "Traceback" not in err, err
    assert snapshot(out) == before                   # not one file moved, added or changed
    assert_lists_exactly_its_own_files(out)
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "msp", "--results", out])
    assert code == 0, text
    assert_lists_exactly_its_own_files(out)
    assert sorted(os.listdir(out)) == sorted(["fitted", "previous", "results.json", "msp.csv", "msp.md",
                                              "summary.md", "summary.csv", "ood", "report.html", "report_files"])
    (kept,) = os.listdir(os.path.join(out, "previous"))
    assert snapshot(os.path.join(out, "previous", kept)) == before


def test_a_full_disk_names_the_file_and_changes_nothing(caches, tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", *SCORES, "--results", out])
    assert code == 0, text
    before = snapshot(out)
    real_open, opened = open, []

    class Full:
        """A file whose writes fail as on a full disk, from the 5th file written on."""
        def __init__(self, path, *a, **k):
            self.f = real_open(path, *a, **k)

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_after_four(path, mode="r", *a, **k):
        if "w" not in mode:
            return real_open(path, mode, *a, **k)
        opened.append(path)
        return real_open(path, mode, *a, **k) if len(opened) < 5 else Full(path, mode, *a, **k)
    monkeypatch.setattr(output, "open", full_after_four, raising=False)
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "all", "--results", out])
    assert code == 2, text
    name = os.path.basename(opened[4])
    assert f"could not write {os.path.join(out, name)}: No space left on device" in text, text
    assert "left as it was" in text and "Traceback" not in text
    assert snapshot(out) == before
    monkeypatch.undo()
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "energy", "--results", out])
    assert code == 0, text
    assert_lists_exactly_its_own_files(out)
    assert "energy.csv" in os.listdir(out) and "knn.csv" not in os.listdir(out)


def test_previous_keeps_the_five_most_recent_runs(caches, tmp_path):
    out = str(tmp_path / "r")
    for i in range(output.KEEP_PREVIOUS + 2):
        code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "msp", "--results", out])
        assert code == 0, text
        assert_lists_exactly_its_own_files(out)
    kept = sorted(os.listdir(os.path.join(out, "previous")))
    assert len(kept) == output.KEEP_PREVIOUS
    assert all("msp.csv" in os.listdir(os.path.join(out, "previous", k)) for k in kept)


def test_a_stage_left_by_a_killed_process_is_removed(caches, tmp_path):
    out = tmp_path / "r"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".r.writing-{int(dead.stdout)}"
    left.mkdir()
    (left / "knn.csv").write_text("half")
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "msp", "--results", str(out)])
    assert code == 0, text
    assert not left.exists()
    assert_lists_exactly_its_own_files(str(out))


def test_a_sweep_writes_its_folder_as_one_set(caches, tmp_path):
    out = str(tmp_path / "s")
    code, text = run(["sweep", "--cache-dir", caches, "--id", "syn", "--grid", "energy:temperature=1,10",
                      "--workers", "1", "--results", out])
    assert code == 0, text
    code, text = run(["sweep", "--cache-dir", caches, "--id", "syn", "--grid", "knn:k=1,5",
                      "--workers", "1", "--results", out])
    assert code == 0, text
    with open(os.path.join(out, "sweep.json")) as f:
        sweep = json.load(f)
    assert set(os.listdir(out)) - {"previous"} == {*sweep["files"], "sweep.json"}
    assert {r["score"] for r in sweep["rows"]} >= {"knn"} and "energy" not in {r["score"] for r in sweep["rows"]
                                                                              if not r.get("paper")}
    (kept,) = os.listdir(os.path.join(out, "previous"))
    assert sorted(os.listdir(os.path.join(out, "previous", kept))) == ["report.html", "sweep.csv", "sweep.json",
                                                                      "sweep.md"]


# ------------------------------------------------------------------ no orphans
SLOW_PLUGIN = '''
import os, time
from gradood.analyze import register_score

@register_score("slow", grid=[{"pause": [20.0, 21.0, 22.0, 23.0]}])
def slow(data, pause=0.0):
    open(os.path.join(os.environ["SWEEP_MARKS"], str(os.getpid())), "w").close()
    time.sleep(pause)
    return data.logits.max(1)
'''


def descendants(pid):
    """Pids of every live process below ``pid``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def running(pid):
    """True while ``pid`` exists and is not a zombie (a zombie holds no memory and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "kill-9"])
def test_a_killed_sweep_leaves_no_process(caches, tmp_path, sig):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN)
    marks = tmp_path / "marks"
    marks.mkdir()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "pipeline.py"), "sweep", "--cache-dir", caches,
                          "--id", "syn", "--ood", "far", "--plugin", str(plugin), "--grid", "slow:pause=20,21,22,23",
                          "--workers", "2", "--results", str(tmp_path / "s")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "SWEEP_MARKS": str(marks), "PYTHONPATH": ROOT})
    deadline = time.time() + 120
    while len(os.listdir(marks)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(marks)) == 2, p.communicate()      # both workers are inside a variant
    family = descendants(p.pid)
    assert {int(m) for m in os.listdir(marks)} <= family
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert p.returncode == 128 + sig and "Traceback" not in err, err
    deadline = time.time() + 10
    while any(running(q) for q in family) and time.time() < deadline:
        time.sleep(0.1)
    left = [q for q in family if running(q)]
    assert not left, [open(f"/proc/{q}/cmdline").read().replace("\0", " ") for q in left if running(q)]
    assert not os.path.exists(tmp_path / "s" / "sweep.json")


def test_intervals_on_a_handful_of_rows_carry_a_warning(tmp_path):
    folder = tmp_path / "tiny"
    write_synthetic(str(folder / "tiny.h5"), 2, num_classes=5, dim=8, seed=2)
    write_synthetic(str(folder / "one.h5"), 1, num_classes=5, dim=8, seed=3, novel=1.0)
    code, text = run(["analyze", "--cache-dir", str(folder), "--id", "tiny", "--score", "msp", "--score", "energy",
                      "--ci", "95", "--compare", "msp,energy", "--results", str(tmp_path / "r")])
    assert code == 0, text
    assert "WARNING: tiny has 2 row(s), one has 1 row(s), fewer than 10" in text, text
    with open(tmp_path / "r" / "summary.md") as f:
        assert "fewer than 10" in f.read()
    write_synthetic(str(folder / "many.h5"), 12, num_classes=5, dim=8, seed=4, novel=1.0)
    write_synthetic(str(tmp_path / "big" / "big.h5"), 12, num_classes=5, dim=8, seed=2)
    os.replace(folder / "many.h5", tmp_path / "big" / "many.h5")
    code, text = run(["analyze", "--cache-dir", str(tmp_path / "big"), "--id", "big", "--score", "msp",
                      "--ci", "95", "--results", str(tmp_path / "r2")])
    assert code == 0 and "Intervals:" in text and "WARNING" not in text, text


def test_the_printed_time_counts_the_figures(caches, tmp_path, monkeypatch):
    real = output.score_histograms

    def slow_histograms(*args):
        time.sleep(1.5)
        return real(*args)
    monkeypatch.setattr(output, "score_histograms", slow_histograms)
    code, text = run(["analyze", "--cache-dir", caches, "--id", "syn", "--score", "msp", "--plots",
                      "--results", str(tmp_path / "r")])
    assert code == 0, text
    total, files = (float(x) for x in re.search(r"caches in ([\d.]+) s \(scores and metrics [\d.]+ s, "
                                                 r"files ([\d.]+) s\)", text).groups())
    assert files >= 1.5 and total >= files, text
