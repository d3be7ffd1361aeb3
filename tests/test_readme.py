"""Every command of the README and of the pages under docs/ runs as written, in order
(the README, then the pages in ``PAGES`` order), in one fresh working folder.

``bash`` blocks: ``pipeline.py`` commands (also written ``gradood ...`` or ``python -m
gradood ...``) run through click, in a folder holding the demo data and a demo-layout
checkpoint, with the pages' placeholders bound to small real files (CKPT, DIR_ID,
DIR_TRAIN, DIR_OOD, ROOT, CACHE, CACHE_OPENOOD, OUT); extractions get the options of
``cheap`` appended so that every page runs in about a minute. ``make`` lines are expanded
with ``make -n`` (the recipes run in the other tests). ``pip install`` lines are what
``tests/test_install.py`` runs. ``python`` blocks run as Python; a block whose first line
is ``# NAME.py`` is written to that file. ``sh`` blocks (a SLURM job script) and ``text`` blocks are shown, not run; a
block of any other language, or of none, fails the test. Relative links between the pages
must name an existing file and heading. The examples of ``extract --help`` are run the
same way.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from gradood.pipeline import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The order the pages run in: later pages use the caches the README's commands extract.
PAGES = ["README.md", "docs/README.md", "docs/data.md", "docs/models.md", "docs/model_table.md", "docs/scores.md",
         "docs/metrics.md",
         "docs/sweeps.md", "docs/report.md", "docs/openood.md", "docs/cache.md", "docs/clusters.md",
         "docs/benchmarks.md"]
RUN, SHOWN = ("bash", "python"), ("sh", "text")


def blocks(text):
    """``[(language, body)]`` of the fenced code blocks of a Markdown text ("" when none is named)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def commands(body):
    """Shell command lines of a block, continuation lines joined, comments dropped."""
    body = body.replace("\\\n", " ")
    out = []
    for line in body.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, demo_files, openood_root, openood_caches):
    """A fresh working folder: ``data/demo`` and ``checkpoints/demo_resnet18.pt`` link to the
    session's demo files (the same images and weights ``make demo``'s steps would make),
    CACHE_OPENOOD holds a copy of the session's OpenOOD caches, made by docs/openood.md's
    own command (which therefore finds them up to date)."""
    base = tmp_path_factory.mktemp("readme")
    data, ckpt = demo_files
    root, _, _ = openood_root
    os.makedirs(base / "data")
    os.symlink(data, base / "data" / "demo")
    os.makedirs(base / "checkpoints")
    os.symlink(ckpt, base / "checkpoints" / "demo_resnet18.pt")
    names = {"CKPT": ckpt,
             "DIR_ID": os.path.join(data, "digits", "test"), "DIR_TRAIN": os.path.join(data, "digits", "train"),
             "DIR_OOD": os.path.join(data, "noise"), "ROOT": root,
             "CACHE_OPENOOD": str(base / "caches" / "openood"), "CACHE": str(base / "caches" / "custom"),
             "OUT": str(base / "out")}
    shutil.copytree(openood_caches, names["CACHE_OPENOOD"])
    return base, names


def cheap(args):
    """The options appended to an extraction so that every page runs in about a minute:
    ``--limit 16`` (training caches keep up to 600 rows, enough for the full-rank covariance
    fits of ``--score all``: ResNet-18's stages have up to 512 channels); the multi-layer
    Mahalanobis pass (about 60 forward passes an image per magnitude) reads the 40 images
    (2 m) that docs/scores.md's ``mahalanobis_ens.m=20`` needs, at one of the release's
    magnitudes. The OpenOOD stand-in sets are small already and take none."""
    if args[0] != "extract" or "--dry-run" in args:
        return args
    if "openood_cifar10" in args:
        return args + ["--quiet"]
    if "--maha-fit" in args:
        return args + ["--limit", "40", "--maha-magnitude", "0.0014", "--quiet"]
    if "train" in args:
        given = int(args[args.index("--limit") + 1]) if "--limit" in args else 600
        return args + ["--limit", str(min(given, 600)), "--quiet"]
    return args + ["--limit", "16", "--quiet"]


def run_pipeline(args, names, cwd):
    args = [names.get(a, a) for a in args]
    args = [re.sub(r"=(DIR_ID|DIR_OOD|DIR_TRAIN)$", lambda m: "=" + names[m.group(1)], a) for a in args]
    args = cheap(args)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)
    assert res.exit_code == 0, f"{' '.join(args)}\n{res.output}"
    return res.output


def run_line(line, names, cwd):
    words = shlex.split(line)
    if words[0] == "make":
        p = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and any(s in p.stdout for s in ("pipeline.py", "pytest", "bench/")), \
            f"{line}\n{p.stdout}{p.stderr}"
        return "make"
    if words[0] == "pip":
        return "pip"
    for prefix in (["gradood"], [".venv/bin/gradood"], ["python", "-m", "gradood"], [".venv/bin/python", "-m", "gradood"],
                   ["python", "pipeline.py"], [".venv/bin/python", "pipeline.py"]):
        if words[:len(prefix)] == prefix:
            run_pipeline(words[len(prefix):], names, cwd)
            return "pipeline"
    if words[0] == ".venv/bin/python" and words[1] == "bench/devices.py":
        return "devices"
    raise AssertionError(f"a command the test does not know how to run: {line}")


def test_pages_are_listed_and_linked():
    """Every docs page runs here, the index links every page, every block is of a known
    language, and every relative link names an existing file (and heading)."""
    assert sorted(PAGES[1:]) == sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    index = read("docs/README.md")
    for page in PAGES[2:]:
        assert f"]({os.path.basename(page)})" in index, f"docs/README.md does not link {page}"
    for page in PAGES:
        text = read(page)
        for lang, _ in blocks(text):
            assert lang in RUN + SHOWN, f"{page}: a ```{lang} block (give it one of {RUN + SHOWN})"
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else \
                os.path.join(ROOT, page)
            assert os.path.exists(path), f"{page}: link {target}: no {path}"
            if anchor and path.endswith(".md"):
                headings = [slug(h) for h in re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", read(path),
                                                                             flags=re.S | re.M), flags=re.M)]
                assert anchor in headings, f"{page}: link {target}: no heading #{anchor} in {file or page}"


def test_every_command_of_the_pages_runs(workdir):
    base, names = workdir
    ran = {"pipeline": 0, "python": 0, "make": 0}
    for page in PAGES:
        for lang, body in blocks(read(page)):
            if lang == "python":
                first = body.splitlines()[0]
                m = re.match(r"# (\w+\.py)$", first)
                if m:
                    (base / m.group(1)).write_text(body)
                    continue
                old = os.getcwd()
                os.chdir(base)
                try:
                    exec(compile(body, page, "exec"), {})
                finally:
                    os.chdir(old)
                ran["python"] += 1
            elif lang == "bash":
                for line in commands(body):
                    kind = run_line(line, names, base)
                    ran[kind] = ran.get(kind, 0) + 1
    assert ran["pipeline"] >= 20 and ran["python"] == 3 and ran["make"] >= 15, ran
    assert os.path.exists(base / "caches" / "python" / "random.h5")
    assert os.path.exists(os.path.join(names["OUT"], "margin", "noise.csv")) is False  # OUT holds the OpenOOD run
    assert os.path.exists(os.path.join(names["OUT"], "gaia_z"))


def test_extract_help_examples_run(workdir):
    base, names = workdir
    res = CliRunner().invoke(cli, ["extract", "--help"])
    examples = res.output.split("Examples:")[1].split("Options:")[0]
    lines = commands(examples)
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line.replace("ckpt.pth", names["CKPT"]).replace("data/LSUN", names["DIR_OOD"])
                            .replace("--preprocess cifar10", "--preprocess demo"))
        assert words[0] == "pipeline.py"
        run_pipeline(words[1:], names, base)
