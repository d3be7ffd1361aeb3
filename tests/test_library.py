"""gradood as a library: user plugins, the Python API without torch, the registry, maps."""
import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradood.analyze.registry import ScoreError, all_entries, default_grid, default_scores, entry, paper_variants
from gradood.extract.models import build_model
from bench.helpers import compute_score, extract_tensor, randomize_norms
from gradood.pipeline import cli
from gradood.store.reader import CacheReader
from gradood.store.schema import stat_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = textwrap.dedent('''
    import numpy as np
    from gradood.analyze import register_score

    @register_score("my_gaia_z_l1", title="GAIA-Z (L1)", needs=[("bn", "max_logit", "nonzero")])
    def my_gaia_z_l1(data, power=1.0):          # data: one block of rows of one cache
        r = np.concatenate([data.stat(l, "max_logit", "nonzero") / data.area(l) for l in data.layers("bn")], axis=1)
        return -np.abs(r).__pow__(power).mean(axis=1)

    @register_score("layer4_map_energy", title="layer4 map energy", needs=[("layer4", "act", "map")])
    def layer4_map_energy(data):
        return -(data.map("layer4", "act").astype(np.float64) ** 2).sum(axis=(1, 2, 3))
''')


@pytest.fixture(scope="session")
def demo(tmp_path_factory, demo_files):
    base = tmp_path_factory.mktemp("lib")
    data, ckpt = demo_files
    cache = str(base / "cache")
    common = ["--benchmark", "demo", "--data-root", data, "--checkpoint", ckpt, "--cache-dir", cache,
              "--batch-size", "8", "--quiet"]
    res = CliRunner().invoke(cli, ["extract", *common, "--limit", "16", "--dataset", "digits",
                                   "--dataset", "noise", "--dataset", "shapes", "--store", "layer4=raw",
                                   "--hook", "layer4"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["extract", *common, "--split", "train", "--dataset", "digits",
                                   "--limit", "30", "--balanced"])
    assert res.exit_code == 0, res.output
    plugin = base / "my_scores.py"
    plugin.write_text(PLUGIN)
    return base, cache, str(plugin)


def _no_torch(code, cwd):
    """Run python ``code`` where importing torch fails; returns the CompletedProcess."""
    guard = ("import sys\n"
             "class NoTorch:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
             "            raise ImportError('torch import blocked: ' + name)\n"
             "sys.meta_path.insert(0, NoTorch())\n")
    return subprocess.run([sys.executable, "-c", guard + code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_plugin_scores_every_cache_as_computed_by_hand(demo):
    base, cache, plugin = demo
    out = base / "plugin_scores"
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", cache, "--id", "digits", "--plugin", plugin,
                                   "--score", "my_gaia_z_l1", "--score", "layer4_map_energy",
                                   "--results", str(base / "res_plugin"), "--scores-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "GAIA-Z (L1)" in res.output and "layer4 map energy" in res.output
    for name in ("digits", "noise", "shapes"):
        with h5py.File(os.path.join(cache, f"{name}.h5")) as f:
            bn = json.loads(f.attrs["hook_sets"])["bn"]
            shapes = json.loads(f.attrs["layer_shapes"])
            r = np.concatenate([f[stat_path(l, "max_logit", "nonzero")][...] / (shapes[l][1] * shapes[l][2])
                                for l in bn], axis=1)
            expected = -np.abs(r).mean(axis=1)
            maps = f[stat_path("layer4", "act", "map")][...].astype(np.float64)
            expected_map = -(maps ** 2).sum(axis=(1, 2, 3))
        for score, want in (("my_gaia_z_l1", expected), ("layer4_map_energy", expected_map)):
            with open(out / score / f"{name}.csv") as fh:
                got = np.array([float(row["score"]) for row in csv.DictReader(fh)])
            np.testing.assert_array_equal(got, want)


def test_plugin_parameters_are_sweepable_and_listed(demo):
    base, cache, plugin = demo
    res = CliRunner().invoke(cli, ["sweep", "--cache-dir", cache, "--id", "digits", "--plugin", plugin,
                                   "--grid", "my_gaia_z_l1:power=1,2,3", "--workers", "1",
                                   "--results", str(base / "sweep_plugin")])
    assert res.exit_code == 0, res.output
    rows = json.loads((base / "sweep_plugin" / "sweep.json").read_text())["rows"]
    powers = sorted(r["params"]["power"] for r in rows if r["score"] == "my_gaia_z_l1")
    assert powers == [1, 2, 3]
    res = CliRunner().invoke(cli, ["sweep", "--cache-dir", cache, "--id", "digits", "--plugin", plugin,
                                   "--grid", "my_gaia_z_l1:powr=1"])
    assert res.exit_code == 2 and "no parameter 'powr'" in res.output
    res = CliRunner().invoke(cli, ["scores", "--plugin", plugin])
    assert res.exit_code == 0 and "my_gaia_z_l1" in res.output and "bn:max_logit/nonzero" in res.output


def test_map_reading_plugin_on_a_cache_without_maps_names_the_policy(demo, tmp_path):
    base, cache, plugin = demo
    from gradood.analyze.registry import load_plugin
    load_plugin(plugin)
    torch.manual_seed(0)
    path = extract_tensor(randomize_norms(build_model("resnet18", 10)), "resnet18", torch.randn(4, 3, 32, 32),
                          str(tmp_path / "c.h5"), ["gaia_z"], hooks=["layer4"], policies={"layer4": "stats"})
    with CacheReader(path) as r, pytest.raises(Exception, match="raw policy"):
        compute_score(r, "layer4_map_energy")


def test_statistics_recomputed_from_maps_equal_the_stored_ones(demo):
    """A raw cache: every built-in statistic recomputed from the maps, and the tolerance count."""
    from gradood.analyze.data import CacheData
    _, cache, _ = demo
    with CacheReader(os.path.join(cache, "noise.h5")) as r:
        stored = CacheData(r)
        m = r.read_all(stat_path("layer4", "max_logit", "map"))
        for stat in ("nonzero", "mean", "abs_mean", "sq_mean", "abs_max"):
            want = r.read_all(stat_path("layer4", "max_logit", stat)).astype(np.float64)
            from gradood.analyze.data import map_stat
            got = map_stat(m, stat)
            if stat == "nonzero":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
        zero_tau = stored.count_above("layer4", "max_logit", 0.0)
        np.testing.assert_array_equal(zero_tau, stored.stat("layer4", "max_logit", "nonzero"))
        tau = float(np.median(np.abs(m[m != 0])))
        above = stored.count_above("layer4", "max_logit", tau)
        assert (above <= zero_tau).all() and (above < zero_tau).any()
        np.testing.assert_array_equal(above, (np.abs(m) > tau).sum(axis=(2, 3)))


def test_python_api_equals_the_cli_without_torch(demo):
    base, cache, plugin = demo
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", cache, "--id", "digits", "--score", "gaia_z",
                                   "--score", "knn", "--score", "msp", "--param", "knn.k=10",
                                   "--results", str(base / "res_api"), "--scores-out", str(base / "api_scores")])
    assert res.exit_code == 0, res.output
    code = textwrap.dedent(f'''
        import json, numpy as np
        from gradood import analyze
        with analyze.open_cache({os.path.join(cache, "noise.h5")!r}) as c:
            n = c.n_samples
            assert c.attrs["dataset"] == "noise"
        z = analyze.score({cache!r}, "noise", "gaia_z")
        k = analyze.score({cache!r}, "noise", "knn", fit_on="digits_train", k=10)
        df = analyze.evaluate({cache!r}, id="digits", scores=["gaia_z", "msp"], convention="sklearn")
        print(json.dumps({{"n": n, "z": z.tolist(), "k": k.tolist(), "columns": list(df.columns),
                          "rows": df.to_dict("records")}}))
        import sys
        assert "torch" not in sys.modules
    ''')
    p = _no_torch(code, str(base))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["columns"] == ["score", "ood", "FPR95", "AUROC", "AUPR_IN", "AUPR_OUT", "DetErr"]
    for score, key in (("gaia_z", "z"), ("knn", "k")):
        with open(base / "api_scores" / score / "noise.csv") as fh:
            want = np.array([float(row["score"]) for row in csv.DictReader(fh)])
        np.testing.assert_array_equal(np.array(out[key]), want)
    results = json.loads((base / "res_api" / "results.json").read_text())["results"]
    for row in out["rows"]:
        if row["score"] in ("gaia_z", "msp"):
            assert row["AUROC"] == results[row["score"]][row["ood"]]["AUROC"]
            assert row["AUPR_IN"] == results[row["score"]][row["ood"]]["AUPR-In"]
    # the demo preset groups noise and shapes as far OOD: their mean is the "farood" row
    assert {r["ood"] for r in out["rows"]} == {"noise", "shapes", "farood", "Average"}


def test_registry_derives_every_list_from_the_entries():
    entries = all_entries()
    assert set(default_scores()) == {n for n, e in entries.items() if e.default}
    assert "tracking" not in default_scores() and "gaia_z" in default_scores()
    labels = paper_variants()
    assert labels["GAIA-Z (paper)"] == ("gaia_z", {})
    assert all(entries[s].grid for s in default_grid())
    from gradood.analyze import register_score
    with pytest.raises(ValueError, match="already registered"):
        register_score("msp")(lambda data: data.logits[:, 0])     # built-ins are not replaced silently
    for name, e in entries.items():
        for table in e.grid:
            assert set(table) <= set(e.params), name
        assert e.fitted == (e.fit_on is not None), name


def test_fit_and_score_parameters_are_kept_apart(demo):
    """A fit parameter refits (react percentile), a scoring parameter does not (knn k), an
    unknown or ill-typed one is refused."""
    from gradood import analyze
    _, cache, _ = demo
    a = analyze.score(cache, "noise", "react", fit_on="digits_train")
    b = analyze.score(cache, "noise", "react", fit_on="digits_train", percentile=50.0)
    assert not np.allclose(a, b)
    assert entry("react").fit_params == ("percentile",) and "k" not in entry("knn").fit_params
    for bad, match in (({"kk": 5}, "no parameter 'kk'"), ({"k": "abc"}, "expected an integer")):
        with pytest.raises(ScoreError, match=match):
            analyze.score(cache, "noise", "knn", fit_on="digits_train", **bad)
    with pytest.raises(ScoreError, match="variant"):
        entry("ash").resolve({"variant": "ash_q"})


def test_imports_run_one_way():
    """extract never imports analyze or pipeline; analyze and store never import extract,
    pipeline or torch (checked on the source)."""
    import ast

    def stage(module):
        """The stage ("analyze", ...) of a gradood module, else the top-level name."""
        parts = module.split(".")
        return parts[1] if parts[0] == "gradood" and len(parts) > 1 else parts[0]

    def imported(folder):
        names = set()
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    tree = ast.parse(open(os.path.join(dirpath, f)).read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names |= {stage(a.name) for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                            names |= ({stage(f"gradood.{a.name}") for a in node.names} if node.module == "gradood"
                                      else {stage(node.module)})
        return names
    assert not imported("extract") & {"analyze", "pipeline"}
    assert not imported("analyze") & {"extract", "pipeline", "torch", "torchvision"}
    assert not imported("store") & {"extract", "analyze", "pipeline", "torch", "torchvision"}


def test_every_demo_table_cell_is_the_same_from_the_cli_and_the_api(demo):
    """`pipeline.py analyze --score all` and `analyze.evaluation(...)` on the same caches:
    the same scores left out, the same cells of summary.csv (and of the bootstrap
    intervals under --ci, same seed), the same LaTeX table from either result."""
    from gradood import analyze
    base, cache, _ = demo
    out = base / "res_all"
    res = CliRunner().invoke(cli, ["analyze", "--cache-dir", cache, "--id", "digits", "--ci", "90",
                                   "--resamples", "50", "--results", str(out)])
    assert res.exit_code == 0, res.output
    ev = analyze.evaluation(cache_dir=cache, id="digits", ci=90, resamples=50)
    assert len(ev.results) >= 20
    assert all(f"note: {line}" in res.output for line in ev.notes if "left out" in line)
    with open(out / "summary.csv") as f:
        cli_rows = list(csv.reader(f))
    api_rows = list(csv.reader(io.StringIO(analyze.to_csv(ev))))
    assert cli_rows[0] == api_rows[0] and len(cli_rows) == len(api_rows) == len(ev.results) + 1
    for a, b in zip(cli_rows, api_rows):
        assert a == b
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(ev.results))
    table = analyze.paper_table(ev)
    assert list(table.index) == [r[0] for r in api_rows[1:]]
    assert table[("noise", "AUROC")].tolist() == [100 * ev.results[n]["noise"]["AUROC"] for n in ev.results]


def test_latex_table_is_booktabs_with_the_best_of_each_column_in_bold(demo):
    """analyze.to_latex(evaluation): one tabular in booktabs rules, a header spanning each OOD set,
    every body row with as many cells as columns, and in each column exactly the best
    value(s) in bold (lowest FPR95, highest AUROC)."""
    import re
    from gradood import analyze
    _, cache, _ = demo
    ev = analyze.evaluation(cache_dir=cache, id="digits", scores=["msp", "energy", "maxlogit", "gaia_z"])
    tex = analyze.to_latex(ev)
    table = analyze.paper_table(ev)
    lines = tex.splitlines()
    assert lines.count(r"\toprule") == lines.count(r"\midrule") == lines.count(r"\bottomrule") == 1
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule") < tex.index(r"\end{tabular}")
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
    n_cols = len(spec)
    assert spec == "l" + "r" * (n_cols - 1) == "l" + "r" * len(table.columns)
    assert tex.count(r"\multicolumn{2}{c}") == len(ev.ood)
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert len(body) == len(ev.results)
    cells = [line.removesuffix(r" \\").split(" & ") for line in body]
    assert all(len(c) == n_cols for c in cells)
    for j, (dataset, metric) in enumerate(table.columns, start=1):
        values = [float(re.sub(r"\\textbf\{(.*)\}", r"\1", c[j])) for c in cells]
        bold = [c[j].startswith(r"\textbf") for c in cells]
        best = min(values) if metric in ("FPR95", "DetErr") else max(values)
        assert bold == [v == best for v in values], (dataset, metric)
    assert r"\caption{" in tex and "ID = digits" in tex


NAN_AND_CONSTANT = '''
import numpy as np
from gradood.analyze import register_score


@register_score("bar_nan")
def bar_nan(data):
    v = data.logits.max(axis=1)
    v[data.rows == 0] = np.nan
    return v


@register_score("bar_const")
def bar_const(data):
    return np.ones(data.n)
'''


@pytest.mark.parametrize("name, message", [("bar_nan", "non-finite value.*row 0"), ("bar_const", "same value")])
def test_every_door_refuses_non_finite_and_constant_scores(demo, tmp_path, name, message):
    """The CLI, ``analyze.score`` and ``analyze.evaluate`` refuse a score that is NaN on one
    usable row (naming the row) or constant, with the same words."""
    import re
    from gradood import analyze
    from gradood.analyze.registry import SCORES
    base, cache, _ = demo
    plugin = tmp_path / "bad_scores.py"
    plugin.write_text(NAN_AND_CONSTANT)
    try:
        res = CliRunner().invoke(cli, ["analyze", "--cache-dir", cache, "--id", "digits", "--score", name,
                                       "--plugin", str(plugin), "--results", str(tmp_path / "r")])
        assert res.exit_code == 2 and re.search(message, res.output), res.output
        analyze.load_plugin(str(plugin))
        with pytest.raises(analyze.ScoreError, match=message):
            analyze.score(cache, "digits", name)
        with pytest.raises(analyze.ScoreError, match=message):
            analyze.evaluate(cache, id="digits", scores=[name])
    finally:
        SCORES.pop("bar_nan", None)
        SCORES.pop("bar_const", None)
