"""gradood: extract gradients once, analyse OOD scores offline.

    pipeline.py extract   run the classifier once over datasets, write HDF5 caches
    pipeline.py analyze   scores, metrics and tables from caches (CPU, no torch)
    pipeline.py sweep     grids of score variants from caches (CPU, no torch, all cores)
    pipeline.py inspect   readable summary of one cache file
    pipeline.py demo      the whole pipeline on the embedded offline benchmark
"""
import json
import os
import sys
import time

import click

from analyze.scores import SCORES
from store.benchmarks import BENCHMARKS, benchmark, ood_sets
from store.schema import POLICIES, CacheError

# What ``extract`` records when no --score is given: every score except ASH (stores the
# last feature map) and gradient tracking (K extra backward passes through the network).
DEFAULT_SCORES = ("gaia_a", "gaia_z", "gradnorm", "nac", "msp", "maxlogit", "energy", "odin",
                  "mahalanobis", "react", "knn", "vim")


def _fail(message):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _default_cache_dir(bench, arch):
    return os.path.join("caches", f"{bench}-{arch}")


def _parse_scores(scores, default=DEFAULT_SCORES):
    """Score names from repeatable, comma-separated --score values; ``all`` = every score."""
    names = []
    for s in scores:
        for part in s.split(","):
            if part == "all":
                names += [n for n in SCORES if n not in names]
            elif part:
                if part not in SCORES:
                    _fail(f"unknown score {part!r}; choose from: {', '.join(SCORES)}, all")
                if part not in names:
                    names.append(part)
    return names or list(default)


def _parse_params(items):
    """``{score: {name: value}}`` from ``SCORE.NAME=VALUE`` items (VALUE parsed as JSON when it can be)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        score, dot, name = key.partition(".")
        if not sep or not dot or score not in SCORES:
            _fail(f"--param {item!r}: expected SCORE.NAME=VALUE with SCORE one of {', '.join(SCORES)}")
        try:
            value = json.loads(value)
        except ValueError:
            value = value.split(",") if "," in value else value
        out.setdefault(score, {})[name] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Gradient-based OOD detection in two stages: extract once (GPU or CPU), analyse
    offline (CPU only). Caches are HDF5 files, one per (model, dataset); their layout is
    documented in store/schema.py."""


# ----------------------------------------------------------------------------- extract
@cli.command()
@click.option("--benchmark", "bench", default=None, help=f"Preset: {', '.join(BENCHMARKS)}. Gives dataset names, layouts, preprocessing, architecture and class count.")
@click.option("--dataset", "datasets", multiple=True, help="Dataset to extract: a preset name (with --benchmark; 'all' for every set) or NAME=DIR for an ImageFolder root. Repeatable.")
@click.option("--data-root", default=None, help="Root folder of the preset datasets. [default: data/<benchmark>]")
@click.option("--arch", default=None, help="Architecture: resnet18, resnet34, resnet50 (GAIA layout), resnet18_32x32, wrn_40_2, BiT-S-R50x1, BiT-S-R101x1, tv_resnet50, tv_mobilenet_v2.")
@click.option("--checkpoint", default=None, type=click.Path(), help="Checkpoint file (bare state dict, {'state_dict':...} or {'model':...}, 'module.' prefixes allowed).")
@click.option("--num-classes", type=int, default=None, help="Classes of the head.")
@click.option("--preprocess", default=None, help="Evaluation transform: cifar10, cifar100, imagenet_bit, imagenet_tv, demo.")
@click.option("--image-size", type=int, default=None, help="Override the crop/resize size of --preprocess.")
@click.option("--cache-dir", default=None, help="Folder of the caches, one <dataset>.h5 each. [default: caches/<benchmark>-<arch>]")
@click.option("--hook", "hooks", multiple=True, help="Hook set (bn, before_head, before_head_gn) or module name to record besides what the scores need. Repeatable.")
@click.option("--score", "scores", multiple=True, help="Scores the cache must serve (decides objectives and stored statistics); 'all' = every score (mahalanobis_ens only with --maha-fit). Repeatable. [default: every score but ash, tracking and mahalanobis_ens]")
@click.option("--policy", default="scores", type=click.Choice(list(POLICIES)), show_default=True, help="Storage policy of every hooked layer (scores: only what the scores read; pooled; stats; raw = full maps).")
@click.option("--store", "store_overrides", multiple=True, help="Per-layer policy, LAYER=POLICY (e.g. layer4=raw). Repeatable.")
@click.option("--odin", "odin_pairs", multiple=True, help="ODIN (temperature, epsilon) pair T,EPS to record, each its own perturbed forward pass. Repeatable. [default: the preset's, else 1000,0.0014]")
@click.option("--maha-fit", type=click.Path(), default=None, help="Record the multi-layer, input-preprocessed Mahalanobis scores (score mahalanobis_ens) with class Gaussians of the stage outputs fitted on this ID training cache (.h5).")
@click.option("--maha-magnitude", "maha_magnitudes", type=float, multiple=True, help="Noise magnitude of the Mahalanobis input preprocessing. Repeatable. [default: the GradNorm release's 0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005]")
@click.option("--maha-adversarial", is_flag=True, help="Also record the scores of pseudo-OOD copies (FGSM, noise 0.05, as the release) that the ensemble's logistic regression is fitted on: give it for the validation set (default: the ID test set).")
@click.option("--split", default="test", type=click.Choice(["test", "train"]), show_default=True, help="With a preset: the ID training split instead of the test split.")
@click.option("--limit", type=int, default=None, help="Extract at most N samples (the first N, or class-balanced with --balanced).")
@click.option("--balanced", is_flag=True, help="With --limit: a class-balanced, seeded subset.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--dry-run", is_flag=True, help="Print layers, shapes, stored statistics and the size estimate, then stop.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(bench, datasets, data_root, arch, checkpoint, num_classes, preprocess, image_size,
            cache_dir, hooks, scores, policy, store_overrides, odin_pairs, maha_fit, maha_magnitudes,
            maha_adversarial, split, limit, balanced, batch_size, device, skip_bad, dry_run, quiet):
    """Run the classifier once over each dataset and write its cache.

    One forward pass per batch, then one backward pass per objective the scores need;
    parameters are frozen and nothing below the earliest hooked layer is backpropagated.
    An interrupted run resumes where it stopped when the same command is run again.

    \b
    Examples:
      pipeline.py extract --benchmark demo --dataset all
      pipeline.py extract --arch resnet18 --checkpoint ckpt.pth --num-classes 10 \\
          --preprocess cifar10 --dataset LSUN=data/LSUN --cache-dir caches/c10
    """
    options = dict(locals())
    from extract import cli_support
    try:
        cli_support.extract_command(**options)
    except (ValueError, FileNotFoundError, CacheError, OSError, RuntimeError) as err:
        _fail(err)


# ----------------------------------------------------------------------------- analyze
@cli.command()
@click.option("--benchmark", "bench", default=None, help="Preset whose ID and OOD set names to use.")
@click.option("--arch", default=None, help="With --benchmark: the architecture part of the default cache folder.")
@click.option("--cache-dir", default=None, help="Folder of the caches. [default: caches/<benchmark>-<arch>]")
@click.option("--id", "id_name", default=None, help="Name of the ID test cache.")
@click.option("--ood", "ood_names", multiple=True, help="OOD cache names. [default: every other cache in the folder, training sets excluded]")
@click.option("--score", "scores", multiple=True, help=f"Scores: {', '.join(SCORES)}, or all (every score the caches can serve; the others are listed with what they lack). Repeatable. [default: all]")
@click.option("--param", "param_items", multiple=True, help="Score hyperparameter, SCORE.NAME=VALUE (e.g. react.percentile=95, knn.k=100, odin.temperature=1000, nac.layers=avgpool,layer3). Repeatable.")
@click.option("--fit-on", default=None, help="Training cache for the fitted scores (Mahalanobis, ReAct, KNN, ViM, NAC-UE). [default: <id>_train]")
@click.option("--metrics", "convention", default="sklearn", type=click.Choice(["sklearn", "gaia"]), show_default=True, help="Metric convention: GradNorm release (scikit-learn) or GAIA release.")
@click.option("--results", "results_dir", default=None, help="Where tables go. [default: results/<cache folder name>]")
@click.option("--scores-out", default=None, help="Also write OUT/<score>/<dataset>.csv (index,path,score).")
@click.option("--allow-partial", is_flag=True, help="Analyse the finished part of unfinished caches.")
@click.option("--plots", is_flag=True, help="Also write PNG score histograms and ROC curves to RESULTS/plots/ (needs matplotlib).")
def analyze(bench, arch, cache_dir, id_name, ood_names, scores, param_items, fit_on, convention,
            results_dir, scores_out, allow_partial, plots=False):
    """Compute scores and metrics from caches and print a paper-style table.

    Runs on CPU without torch. Scores are oriented higher = more in-distribution; metrics
    treat ID as the positive class. Fitted scores are fitted on the ID training cache
    (<id>_train) once; the fitted arrays are kept in RESULTS/fitted/ and reused.
    """
    from analyze.report import evaluate, unavailable_scores, write_report, write_scores_csv
    explicit = [p for s in scores for p in s.split(",") if p and p != "all"]
    names = _parse_scores(scores or ("all",))
    params = _parse_params(param_items)
    try:
        cache_dir, id_name, ood_names = _caches(bench, arch, cache_dir, id_name, ood_names)
        out = results_dir or os.path.join("results", os.path.basename(os.path.normpath(cache_dir)))
        missing = unavailable_scores(cache_dir, id_name, names, fit_on)
        bad = [s for s in explicit if s in missing]
        if bad:
            _fail("; ".join(f"{s}: {missing[s]}" for s in bad))
        for score, why in missing.items():
            click.echo(f"note: {score} left out: {why}", err=True)
        names = [n for n in names if n not in missing]
        if not names:
            _fail("none of the requested scores can be computed from these caches")
        start = time.time()
        ev = evaluate(cache_dir, id_name, list(ood_names), names, convention, allow_partial,
                      params, fit_on, os.path.join(out, "fitted"))
        elapsed = time.time() - start
        text = write_report(ev, out)
        if scores_out:
            write_scores_csv(ev, scores_out)
        if plots:
            from analyze.plots import roc_curves, score_histograms
            figures = score_histograms(ev, os.path.join(out, "plots")) + roc_curves(ev, os.path.join(out, "plots"))
    except (ValueError, FileNotFoundError, CacheError) as err:
        _fail(err)
    click.echo(text)
    click.echo(f"\n{len(names)} score(s) on {1 + len(ood_names)} caches in {elapsed:.2f} s; tables in {out}/")
    if plots:
        click.echo(f"{len(figures)} figures in {out}/plots/")


def _caches(bench, arch, cache_dir, id_name, ood_names):
    """(cache_dir, id_name, ood_names) from a preset and/or explicit options."""
    if bench:
        preset = benchmark(bench)
        cache_dir = cache_dir or _default_cache_dir(bench, arch or preset["arch"])
        id_name = id_name or preset["id"]
    if not cache_dir or not id_name:
        _fail("give --benchmark, or --cache-dir and --id")
    if not os.path.isdir(cache_dir):
        _fail(f"cache folder {cache_dir} does not exist; extract first (pipeline.py extract)")
    if not ood_names:
        present = sorted(f[:-3] for f in os.listdir(cache_dir) if f.endswith(".h5"))
        order = ood_sets(bench) if bench else present
        ood_names = [n for n in order if n in present and n != id_name and not n.endswith("_train")]
    if not ood_names:
        _fail(f"no OOD caches in {cache_dir}; extract some first (pipeline.py extract)")
    return cache_dir, id_name, list(ood_names)


# ----------------------------------------------------------------------------- sweep
@cli.command()
@click.option("--benchmark", "bench", default=None, help="Preset whose ID and OOD set names to use.")
@click.option("--arch", default=None, help="With --benchmark: the architecture part of the default cache folder.")
@click.option("--cache-dir", default=None, help="Folder of the caches. [default: caches/<benchmark>-<arch>]")
@click.option("--id", "id_name", default=None, help="Name of the ID test cache.")
@click.option("--ood", "ood_names", multiple=True, help="OOD cache names. [default: every other cache]")
@click.option("--grid", "grids", multiple=True, help="Grid for one score, SCORE:KEY=V1,V2;KEY=V3 (e.g. 'gaia_z:spatial=nonzero,l2;channel=sq_mean,max;layers=all,each'). Repeatable. [default: the built-in grid over GAIA-Z, GAIA-A, NAC-UE and the baselines]")
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False), default=None, help="TOML grid: one [score] table (or [[score]] tables) of KEY = [values].")
@click.option("--fit-on", default=None, help="Training cache for fitted scores. [default: <id>_train]")
@click.option("--select-on", default=None, help="Validation OOD set: rank variants on it only and report the others (no test leakage).")
@click.option("--metric", default="FPR95", type=click.Choice(["FPR95", "AUROC"]), show_default=True, help="Ranking metric.")
@click.option("--workers", type=int, default=None, help="Processes. [default: all cores]")
@click.option("--top", type=int, default=15, show_default=True, help="Rows printed (the files hold all).")
@click.option("--results", "results_dir", default=None, help="Where the sweep goes. [default: results/<cache folder name>/sweep]")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Per-layer contribution bar charts (needs matplotlib).")
def sweep(bench, arch, cache_dir, id_name, ood_names, grids, grid_file, fit_on, select_on, metric,
          workers, top, results_dir, plots):
    """Evaluate a grid of score variants from the caches alone (CPU, no torch, all cores).

    Variants: layer subsets and single layers, spatial reduction (nonzero, mean, sum,
    max, l1, l2), channel aggregation (sq_mean, mean, l1, l2, max), objective, NAC's M,
    O and alpha, temperatures and the baselines' hyperparameters. The published
    configurations are always included and marked. Writes sweep.md / .csv / .json.
    """
    from analyze.sweep import DEFAULT_GRID, load_grid_file, parse_grid_text, run_sweep, sweep_table, write_sweep
    from analyze.report import plain
    try:
        cache_dir, id_name, ood_names = _caches(bench, arch, cache_dir, id_name, ood_names)
        grid = {}
        if grid_file:
            grid.update(load_grid_file(grid_file))
        for score, tables in parse_grid_text(grids).items():
            grid.setdefault(score, []).extend(tables)
        result = run_sweep(cache_dir, id_name, ood_names, grid or DEFAULT_GRID, fit_on, workers,
                           select_on, metric)
        out = results_dir or os.path.join("results", os.path.basename(os.path.normpath(cache_dir)), "sweep")
        path = write_sweep(result, out)
        figures = []
        if plots:
            from analyze.plots import layer_contribution
            figures = layer_contribution(result, out)
    except (ValueError, FileNotFoundError, CacheError, RuntimeError) as err:
        _fail(err)
    header, rows = sweep_table(result, top)
    click.echo(plain(header, rows))
    click.echo(f"\n{result['n_variants']} variants ({len(result['errors'])} not servable) in "
               f"{result['seconds']:.1f} s on {result['workers']} processes; table in {path}"
               + (f"; {len(figures)} figures in {out}/" if figures else ""))


# ----------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("cache_file", type=click.Path())
def inspect(cache_file):
    """Readable summary of a cache: provenance, layers, stored statistics, sizes."""
    from store.inspect import summary
    try:
        click.echo(summary(cache_file))
    except CacheError as err:
        _fail(err)


# ----------------------------------------------------------------------------- demo
@cli.command()
@click.option("--data-root", default="data/demo", show_default=True)
@click.option("--checkpoint", default="checkpoints/demo_resnet18.pt", show_default=True, help="Trained at first use, reused afterwards.")
@click.option("--cache-dir", default="caches/demo-resnet18", show_default=True)
@click.option("--results", "results_dir", default="results/demo-resnet18", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
def demo(data_root, checkpoint, cache_dir, results_dir, device, batch_size):
    """The whole pipeline on the embedded offline benchmark (sklearn digits vs generated OOD sets)."""
    from extract import cli_support
    try:
        cli_support.demo_command(data_root, checkpoint, cache_dir, device, batch_size)
    except (ValueError, FileNotFoundError, CacheError, OSError) as err:
        _fail(err)
    ctx = click.get_current_context()
    ctx.invoke(analyze, bench="demo", cache_dir=cache_dir, results_dir=results_dir,
               scores=("all",), param_items=(), fit_on=None, convention="sklearn", plots=True)
    click.echo("")
    ctx.invoke(sweep, bench="demo", cache_dir=cache_dir, results_dir=os.path.join(results_dir, "sweep"),
               grids=(), grid_file=None, fit_on=None, select_on=None, metric="FPR95", workers=None,
               top=15, plots=True)


if __name__ == "__main__":
    cli()
