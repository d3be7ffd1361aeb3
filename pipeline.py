"""gradood: extract gradients once, analyse OOD scores offline.

    pipeline.py extract   run the classifier once over datasets, write HDF5 caches
    pipeline.py analyze   scores, metrics and tables from caches (CPU, no torch)
    pipeline.py sweep     grids of score variants from caches (CPU, no torch, all cores)
    pipeline.py inspect   readable summary of one cache file
    pipeline.py scores    the registered scores: what each reads, what it is fitted on
    pipeline.py demo      the whole pipeline on the embedded offline benchmark

The only module that imports both stages: it turns score names into what extraction
records (``analyze.requirements``) and prints; the stages themselves raise.
"""
import json
import os
import re
import sys
import time

if __name__ == "__main__" and not __package__:
    # ``python pipeline.py`` from a checkout that is not installed: the checkout is the
    # package ``gradood`` (setup.cfg maps the repository root to it).
    import importlib.util
    if importlib.util.find_spec("gradood") is None:
        _root = os.path.dirname(os.path.abspath(__file__))
        _spec = importlib.util.spec_from_file_location("gradood", os.path.join(_root, "__init__.py"),
                                                       submodule_search_locations=[_root])
        sys.modules["gradood"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["gradood"])

import click

from gradood.analyze.api import checkpoint_evaluation, evaluation, resolve_caches, score_names
from gradood.analyze.grids import load_grid_file, parse_grid_text
from gradood.analyze.metrics import CONVENTIONS
from gradood.analyze.output import (default_results_dir, write_checkpoints_report, write_report, write_scores_csv,
                                    write_sweep)
from gradood.analyze.request import AnalysisRequest
from gradood.analyze.sweep import run_sweep
from gradood.analyze.tables import plain, sweep_table
from gradood.extract.config import ExtractConfig, parse_hook_sets
from gradood.analyze.registry import ScoreError, all_entries, canonical, default_scores, entry, load_plugin, requirements
from gradood.store.benchmarks import BENCHMARKS, preset_params
from gradood.store.recipes import BATCH_SIZE, HOOK_SETS
from gradood.store.schema import POLICIES, CacheError, head_label

ERRORS = (ValueError, FileNotFoundError, CacheError, OSError, RuntimeError, ScoreError)


def _fail(message):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _interrupted(err):
    """Report an interrupt (Ctrl-C, or a scheduler's SIGTERM: ``_terminate_as_interrupt``)
    and exit 130, or 143 for SIGTERM, as a shell would."""
    text = str(err) or "interrupted"
    click.echo(f"\n{text}", err=True)
    sys.exit(143 if _TERMINATED else 130)


_TERMINATED = []


def _terminate_as_interrupt():
    """Treat SIGTERM (a cluster's time limit, ``kill``) like Ctrl-C: the run unwinds, keeps
    what it finished, removes its lock and says how to resume."""
    import signal

    def handler(signum, frame):
        _TERMINATED.append(signum)
        raise KeyboardInterrupt("terminated (SIGTERM)")
    signal.signal(signal.SIGTERM, handler)


def _extract_stage():
    """``extract.cli_support``, or a one-line error when PyTorch is not installed."""
    try:
        from gradood.extract import cli_support
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("torch", "torchvision", "PIL"):
            _fail(f"extraction needs PyTorch ({err.name} is not installed): pip install "
                  "'gradood[extract]' (or `make install` in the repository). Analysis, sweeps "
                  "and inspect work without it.")
        raise
    return cli_support


def training_scores():
    """The default scores fitted on the ID training cache: what a training cache serves."""
    return [n for n in default_scores() if entry(n).fit_on == "train"]


def _load_plugins(plugins):
    for path in plugins:
        try:
            load_plugin(path)
        except ScoreError as err:
            _fail(err)


def _parse_scores(items, all_means):
    """``(names, explicit)`` from repeatable, comma-separated --score values
    (``analyze.api.score_names``); ``all`` = ``all_means``; ``([], [])`` without any."""
    try:
        return score_names(items, every=all_means) if items else ([], [])
    except ScoreError as err:
        _fail(err)


def _parse_params(items, names=None):
    """``{score: {name: value}}`` from ``SCORE.NAME=VALUE`` items (VALUE parsed as JSON when
    it can be, ``a,b`` as a list); unknown scores, parameters and values are refused, and
    so are parameters of scores that are not requested (``names``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        score, dot, name = key.partition(".")
        if not sep or not dot or not name:
            _fail(f"--param {item!r}: expected SCORE.NAME=VALUE, e.g. knn.k=100")
        try:
            score = canonical(score)
        except ScoreError:
            _fail(f"--param {item!r}: unknown score {score!r}; choose from: {', '.join(all_entries())}")
        if names is not None and score not in names:
            _fail(f"--param {item!r}: {score} is not among the requested scores ({', '.join(names)}); "
                  f"add --score {score} or drop the parameter")
        try:
            value = json.loads(value)
        except ValueError:
            value = value.split(",") if "," in value else value
        out.setdefault(score, {})[name] = value
        try:
            entry(score).resolve(out[score])
        except ScoreError as err:
            _fail(f"--param {item!r}: {err}")
    return out


def _check_writable(folder, option):
    """Fail early, naming the option, when ``folder`` cannot be created or written."""
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OSError(f"{folder} is a file, not a folder")
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        _fail(f"{option} {folder}: cannot write there ({err.strerror or err}); choose another folder")


def _device(ctx, param, value):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Gradient-based OOD detection in two stages: extract once (GPU or CPU), analyse
    offline (CPU only). Caches are HDF5 files, one per (model, dataset); their layout is
    declared in store/schema.py. Run inside the project's environment
    (.venv/bin/python pipeline.py ..., or after `source .venv/bin/activate`)."""


# ----------------------------------------------------------------------------- extract
@cli.command()
@click.option("--benchmark", "bench", default=None, help=f"Preset: {', '.join(BENCHMARKS)}. Gives dataset names, layouts, preprocessing, architecture, class count (demo: also the checkpoint).")
@click.option("--dataset", "datasets", multiple=True, help="Dataset to extract: a preset name (with --benchmark; 'all' for every set), NAME=DIR for an ImageFolder root, or NAME=LIST.txt for an image list (paths relative to --data-root). Repeatable.")
@click.option("--data-root", default=None, help="Root folder of the preset datasets and of image-list paths. [default: data/<benchmark>]")
@click.option("--arch", default=None, help="Architecture: torchvision:NAME (any torchvision classifier), timm:NAME (needs gradood[timm]), or the state-dict layout of an author's release (resnet18, wrn_40_2, BiT-S-R101x1, ...: the table in docs/models.md; an unknown name lists them all). Weights always come from --checkpoint.")
@click.option("--model-file", default=None, help="Your own model: FILE.py:FUNC, where FUNC(num_classes) returns an nn.Module (instead of --arch). The file's path and SHA-256 are recorded.")
@click.option("--head", default=None, help="Module name of the linear head. [default: found by tracing: the last nn.Linear / 1x1 nn.Conv2d whose output is the model's output; without one, the scores that read the head are left out, see docs/models.md]")
@click.option("--output", "output", default=None, help="For a model returning a tuple, dict or dataclass: the index or key of its (N, K) logits. [default: its 'logits' entry, else its one (N, K) tensor; several are refused as ambiguous]")
@click.option("--hook-set", "hook_sets", multiple=True, help="Replace a hook set by module names or globs, NAME=PATTERN[,PATTERN...], e.g. bn='features.*.norm*' or nac=encoder.layers.encoder_layer_9,encoder.layers.encoder_layer_10. Repeatable.")
@click.option("--checkpoint", default=None, type=click.Path(), help="Checkpoint file (bare state dict, {'state_dict':...} or {'model':...}, 'module.' prefixes allowed). [default: the demo preset's]")
@click.option("--num-classes", type=click.IntRange(min=2), default=None, help="Classes of the head.")
@click.option("--preprocess", default=None, help="Evaluation transform: cifar10, cifar100, imagenet_bit, imagenet_tv, demo, openood_cifar10, openood_cifar100, totensor (ToTensor alone, as Open_OOD), timm (the timm model's data config).")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Override the crop/resize size of --preprocess.")
@click.option("--cache-dir", default=None, help="Folder of the caches, one <dataset>.h5 each. [default: caches/<benchmark>-<arch>]")
@click.option("--hook", "hooks", multiple=True, help=f"Hook set ({', '.join(HOOK_SETS)}) or module name to record besides what the scores need (with --policy/--store). Repeatable.")
@click.option("--score", "scores", multiple=True, help="Scores the cache must serve (decides objectives and stored statistics); 'all' = every score (mahalanobis_ens only with --maha-fit). Repeatable. [default: every score marked default, see `pipeline.py scores`; those the model cannot serve, and those of 'all', are left out with a note, a score named explicitly must be served; with --split train the default scores fitted on training data, which is what a training cache serves]")
@click.option("--param", "param_items", multiple=True, help="Score parameter that changes what is recorded, SCORE.NAME=VALUE (e.g. nac.layers=avgpool,layer3). Repeatable.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(), help="Python file registering scores (from gradood.analyze import register_score); their needs are recorded. Repeatable.")
@click.option("--policy", default="scores", type=click.Choice(list(POLICIES)), show_default=True, help="Storage policy of every hooked layer (scores: only what the scores read; pooled; stats; raw = full maps).")
@click.option("--store", "store_overrides", multiple=True, help="Per-layer policy, LAYER=POLICY (e.g. layer4=raw). Repeatable.")
@click.option("--odin", "odin_pairs", multiple=True, help="ODIN pass T,EPS (GradNorm release: sign gradient) or T,EPS,std (original ODIN and OpenOOD: sign gradient divided by the normalisation std). Repeatable. [default: the preset's, else 1000,0.0014]")
@click.option("--maha-fit", type=click.Path(), default=None, help="Record the multi-layer, input-preprocessed Mahalanobis scores (score mahalanobis_ens) with class Gaussians of the stage outputs fitted on this ID training cache (.h5).")
@click.option("--maha-magnitude", "maha_magnitudes", type=float, multiple=True, help="Noise magnitude of the Mahalanobis input preprocessing. Repeatable. [default: the GradNorm release's 0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005]")
@click.option("--maha-adversarial", is_flag=True, help="Also record the scores of pseudo-OOD copies (FGSM, noise 0.05, as the release) that the ensemble's logistic regression is fitted on: give it for the validation set (default: the ID test set).")
@click.option("--split", default="test", type=click.Choice(["test", "train"]), show_default=True, help="train: the ID training split of a preset (cache <id>_train), or NAME=DIR written as NAME_train.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Extract at most N samples (the first N, or class-balanced with --balanced).")
@click.option("--balanced", is_flag=True, help="With --limit: a class-balanced, seeded subset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace existing caches of the same names (default: skip those that are complete and equal, refuse those that differ).")
@click.option("--dry-run", is_flag=True, help="Print passes, layers, shapes, stored statistics and the size estimate, then stop.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(bench, datasets, data_root, arch, model_file, head, output, hook_sets, checkpoint, num_classes, preprocess, image_size,
            cache_dir, hooks, scores, param_items, plugins, policy, store_overrides, odin_pairs, maha_fit,
            maha_magnitudes, maha_adversarial, split, limit, balanced, batch_size, device, skip_bad,
            overwrite, dry_run, quiet):
    """Run the classifier once over each dataset and write its cache.

    One forward pass per batch, then one backward pass per objective the scores need,
    each stopping at the earliest layer whose statistics it feeds; parameters are frozen.
    An interrupted run resumes where it stopped when the same command is run again.

    \b
    Examples:
      pipeline.py extract --benchmark demo --dataset noise --dataset shapes
      pipeline.py extract --arch resnet18 --checkpoint ckpt.pth --num-classes 10 \\
          --preprocess cifar10 --dataset LSUN=data/LSUN --cache-dir caches/c10
    """
    _load_plugins(plugins)
    everything = [n for n in all_entries() if n != "mahalanobis_ens" or maha_fit]
    names, explicit = _parse_scores(scores, everything)
    names = names or (training_scores() if split == "train" else default_scores())
    if "mahalanobis_ens" in names and not maha_fit:
        _fail("the multi-layer Mahalanobis ensemble needs --maha-fit TRAIN_CACHE (the ID training "
              "cache, e.g. caches/<benchmark>-<arch>/<id>_train.h5)")
    params = _parse_params(param_items, names)
    if bench:   # the preset's score settings decide what is recorded, as they do in analysis
        params = preset_params({"benchmark": bench}, params)
    stage = _extract_stage()
    _terminate_as_interrupt()
    try:
        needs, passes = requirements(names, params)
        config = ExtractConfig(
            needs=needs, passes=passes, benchmark=bench, datasets=datasets, data_root=data_root, arch=arch,
            model_file=model_file, head=head, output=output, hook_sets=hook_sets, checkpoint=checkpoint, num_classes=num_classes,
            preprocess=preprocess, image_size=image_size, cache_dir=cache_dir, hooks=hooks, policy=policy,
            store=store_overrides, odin=odin_pairs, maha_fit=maha_fit, maha_magnitudes=maha_magnitudes,
            maha_adversarial=maha_adversarial, split=split, limit=limit, balanced=balanced, batch_size=batch_size,
            device=device, scores=tuple(names), skip_bad=skip_bad, dry_run=dry_run, progress=not quiet,
            overwrite=overwrite, refusals=lambda adapter: model_refusals(names, params, adapter),
            score_needs={n: requirements([n], params) for n in names},
            optional=tuple(n for n in names if n not in explicit))
        stage.extract_command(config, click.echo)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except ERRORS as err:
        _fail(err)


# ----------------------------------------------------------------------------- analyze
@cli.command()
@click.option("--benchmark", "bench", default=None, help="Preset whose ID and OOD set names to use.")
@click.option("--arch", default=None, help="With --benchmark: the architecture part of the default cache folder.")
@click.option("--cache-dir", default=None, help="Folder of the caches. [default: caches/<benchmark>-<arch>]")
@click.option("--id", "id_name", default=None, help="Name of the ID test cache.")
@click.option("--ood", "ood_names", multiple=True, help="OOD cache names. [default: every other cache in the folder, training, fitting and validation caches excluded]")
@click.option("--score", "scores", multiple=True, help="Scores (see `pipeline.py scores`), or all: every score all the caches can serve (the others are listed with what they lack). Repeatable. [default: all]")
@click.option("--param", "param_items", multiple=True, help="Score parameter, SCORE.NAME=VALUE (e.g. react.percentile=95, knn.k=100, odin.temperature=1000, nac.layers=avgpool,layer3). Repeatable.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(), help="Python file registering scores (from gradood.analyze import register_score). Repeatable.")
@click.option("--fit-on", default=None, help="Training cache for the scores fitted on training data (Mahalanobis, ReAct, KNN, ViM, NAC-UE, ...). [default: <id>_train]")
@click.option("--metrics", "convention", default="sklearn", type=click.Choice(list(CONVENTIONS)), show_default=True, help="Metric convention: ID positive as the GradNorm release (scikit-learn) or the GAIA release, or OOD positive as OpenOOD v1.5.")
@click.option("--tune-on", default=None, help="OOD validation cache: choose each score's hyperparameters (its sweep grid) by AUROC against the ID validation cache, as OpenOOD's parameter search, then report the test sets with them.")
@click.option("--tune-id", default=None, help="ID validation cache for --tune-on. [default: the preset's, else <id>_val]")
@click.option("--results", "results_dir", default=None, help="Where tables go (rewritten as one consistent set per run). [default: results/<cache folder name>]")
@click.option("--scores-out", default=None, help="Also write OUT/<score>/<dataset>.csv (index,path,score,skipped).")
@click.option("--allow-partial", is_flag=True, help="Analyse the finished part of unfinished caches.")
@click.option("--allow-overlap", is_flag=True, help="Accept a fitting cache (training or validation) that shares images with the ID or OOD test caches (refused by default: the scores would be fitted on their test images).")
@click.option("--plots/--no-plots", default=False, show_default=True, help="PNG score histograms and ROC curves in RESULTS/plots/ (needs matplotlib).")
@click.option("--gallery", type=click.IntRange(min=1), default=8, show_default=True, help="Images per failure gallery of RESULTS/report.html: per score and OOD set the K OOD images ranked most in-distribution, and the K ID images ranked least.")
@click.option("--ci", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=None, help="Add a LEVEL % bootstrap interval of FPR95 and AUROC to every cell (ID and OOD resampled independently, seeded). E.g. --ci 95.")
@click.option("--resamples", type=click.IntRange(min=10), default=1000, show_default=True, help="Bootstrap resamples for --ci and --compare.")
@click.option("--ci-seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--checkpoint-dirs", default=None, help="DIR1,DIR2,...: cache folders of several trained checkpoints of one benchmark (the same sets and images in each); report every cell as mean ± std over them and a deep-ensemble row (instead of --cache-dir).")
@click.option("--csid", "csid", multiple=True, help="Covariate-shifted ID set (labelled images of the ID classes, e.g. OpenOOD's cifar10c, imagenet_r): counted as ID in a second, full-spectrum (FS-OOD) table, as OpenOOD's --fsood, with its accuracy. Repeatable. [default: the benchmark's csid sets the folder holds]")
@click.option("--compare", "compare", multiple=True, help="A,B: per OOD set, the paired difference A - B of AUROC and FPR95 on the same samples, its bootstrap interval (at --ci, default 95) and DeLong's test; '*' marks an interval that excludes zero. Repeatable.")
def analyze(bench, arch, cache_dir, id_name, ood_names, scores, param_items, plugins, fit_on, convention,
            results_dir, scores_out, allow_partial, plots, tune_on=None, tune_id=None, allow_overlap=False,
            ci=None, resamples=1000, ci_seed=0, csid=(), compare=(), checkpoint_dirs=None, gallery=8):
    """Compute scores and metrics from caches and print a paper-style table.

    Runs on CPU without torch. Scores are oriented higher = more in-distribution; metrics
    treat ID as the positive class. Fitted scores are fitted once on their fitting cache;
    the fitted attributes are kept in RESULTS/fitted/ and reused.
    """
    _load_plugins(plugins)
    _terminate_as_interrupt()
    scores = scores or ("all",)
    try:
        names, _ = score_names([*scores, *compare])      # compared scores are requested too
    except ScoreError as err:
        _fail(err)
    params = _parse_params(param_items, None if "all" in ",".join(scores) else names)
    members = tuple(d.strip() for d in (checkpoint_dirs or "").split(",") if d.strip())
    try:
        if members and (plots or scores_out):
            _fail("--checkpoint-dirs reports mean ± std over checkpoints; --plots and --scores-out apply "
                  "to one checkpoint's folder (--cache-dir)")
        if not members:
            cache_dir, _, _ = resolve_caches(cache_dir, id_name, ood_names, bench, arch)
        out = results_dir or default_results_dir(list(members) or [cache_dir])
        _check_writable(out, "--results")
        if scores_out:
            _check_writable(scores_out, "--scores-out")
        request = AnalysisRequest(cache_dir=cache_dir, checkpoint_dirs=members, id=id_name, scores=scores,
                                  ood=ood_names, convention=convention, fit_on=fit_on, params=params,
                                  tune_on=tune_on, tune_id=tune_id, benchmark=bench, arch=arch,
                                  allow_partial=allow_partial, fitted_dir=os.path.join(out, "fitted"),
                                  allow_overlap=allow_overlap, ci=ci, resamples=resamples, seed=ci_seed,
                                  compare=compare, csid=csid or None, progress=sys.stderr.isatty())
        start = time.time()
        if members:
            ce = checkpoint_evaluation(request)
            for line in ce.notes:
                click.echo(f"note: {line}", err=True)
            click.echo(write_checkpoints_report(ce, out).text)
            click.echo(f"\n{len(ce.results)} row(s) over {len(members)} checkpoints in "
                       f"{time.time() - start:.2f} s; tables in {out}/")
            return
        ev = evaluation(request)
        for line in ev.notes:
            click.echo(("" if line.startswith("tuned") else "note: ") + line, err=True)
        scoring = time.time() - start
        written = write_report(ev, out, plots, gallery)
        if scores_out:
            write_scores_csv(ev, scores_out)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except ERRORS as err:
        _fail(err)
    click.echo(written.text)
    figures = f", {len(written.figures)} figures in {out}/plots/" if plots else ""
    click.echo(f"\n{len(ev.results)} score(s) on {1 + len(ev.ood)} caches in {time.time() - start:.2f} s "
               f"(scores and metrics {scoring:.2f} s, files {time.time() - start - scoring:.2f} s); "
               f"tables in {out}/{figures}")
    click.echo(f"report: {written.report} (open it in a browser)" if written.report else f"note: {written.report_note}")


# ----------------------------------------------------------------------------- sweep
@cli.command()
@click.option("--benchmark", "bench", default=None, help="Preset whose ID and OOD set names to use.")
@click.option("--arch", default=None, help="With --benchmark: the architecture part of the default cache folder.")
@click.option("--cache-dir", default=None, help="Folder of the caches. [default: caches/<benchmark>-<arch>]")
@click.option("--id", "id_name", default=None, help="Name of the ID test cache.")
@click.option("--ood", "ood_names", multiple=True, help="OOD cache names. [default: every other cache, training caches excluded]")
@click.option("--grid", "grids", multiple=True, help="Grid for one score, SCORE:KEY=V1,V2;KEY=V3 (e.g. 'gaia_z:spatial=nonzero,l2;channel=sq_mean,max;layers=all,each'); keys are the score's parameters. Repeatable. [default: every score's built-in grid]")
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False), default=None, help="TOML grid: one [score] table (or [[score]] tables) of KEY = [values].")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(), help="Python file registering scores; their keyword parameters are sweepable. Repeatable.")
@click.option("--fit-on", default=None, help="Training cache for fitted scores. [default: <id>_train]")
@click.option("--select-on", default=None, help="Validation OOD set: rank variants on it only and report the others (no test leakage).")
@click.option("--csid", "csid", multiple=True, help="Covariate-shifted ID set: rank in the full-spectrum setting, the ID side the ID test set followed by the csid sets (as analyze --csid). Repeatable.")
@click.option("--rank-by", "--metric", "rank_by", default="FPR95", type=click.Choice(["FPR95", "AUROC"]), show_default=True, help="Ranking metric (scikit-learn convention).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes. [default: all cores]")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Rows printed (the files hold all).")
@click.option("--results", "results_dir", default=None, help="Where the sweep goes. [default: results/<cache folder name>/sweep]")
@click.option("--allow-partial", is_flag=True, help="Sweep over the finished part of unfinished caches.")
@click.option("--plots/--no-plots", default=False, show_default=True, help="Per-layer contribution bar charts (needs matplotlib).")
def sweep(bench, arch, cache_dir, id_name, ood_names, grids, grid_file, plugins, fit_on, select_on, rank_by,
          workers, top, results_dir, allow_partial, plots, csid=()):
    """Evaluate a grid of score variants from the caches alone (CPU, no torch, all cores).

    Variants: layer subsets and single layers, spatial reduction (nonzero, mean, sum,
    max, l1, l2), channel aggregation (sq_mean, mean, l1, l2, max), objective, NAC's M,
    O and alpha, temperatures and the baselines' hyperparameters, and any plugin score's
    keyword parameters. The published configurations are always included and marked.
    Writes sweep.md / .csv / .json.
    """
    _load_plugins(plugins)
    _terminate_as_interrupt()
    try:
        cache_dir, id_name, ood_names = resolve_caches(cache_dir, id_name, ood_names, bench, arch, csid)
        out = results_dir or os.path.join(default_results_dir([cache_dir]), "sweep")
        _check_writable(out, "--results")
        grid = {}
        if grid_file:
            grid.update(load_grid_file(grid_file))
        for score, tables in parse_grid_text(grids).items():
            grid.setdefault(score, []).extend(tables)
        result = run_sweep(cache_dir, id_name, ood_names, grid or None, fit_on, workers, select_on,
                           rank_by, plugins, allow_partial, progress=sys.stderr.isatty(), csid=csid)
        written = write_sweep(result, out, plots)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except ERRORS as err:
        _fail(err)
    header, rows = sweep_table(result, top)
    click.echo(plain(header, rows))
    skipped = sum(v["count"] for v in result.not_stored.values())
    kinds = {}
    for e in result.errors:
        kinds.setdefault(e.get("kind", "not servable"), []).append(e)
    counts = ", ".join(f"{len(v)} {k}" for k, v in kinds.items()) or "all served"
    crashed = kinds.get("crashed", [])
    if written.report_note:
        click.echo(f"note: {written.report_note}", err=True)
    click.echo(f"\n{result.n_variants} variants ({counts}) in "
               f"{result.seconds:.1f} s on {result.workers} processes; table in {out}/sweep.md"
               + (f"; {len(written.figures)} figures in {out}/" if written.figures else "")
               + (f"\n{skipped} variants of the default grid are not served by these caches (statistics they do "
                  "not store: extract with --policy stats; or the model, e.g. no linear head); each with its "
                  "reason in the table's caption" if skipped else "")
               + (f"\n{len(crashed)} variants CRASHED (a bug in the score, not a missing statistic), "
                  f"e.g. {crashed[0]['label']}: {crashed[0]['error']}" if crashed else ""))


# ----------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("cache_file", type=click.Path())
def inspect(cache_file):
    """Readable summary of a cache: provenance, layers, stored statistics, sizes."""
    from gradood.store.inspect import summary
    try:
        click.echo(summary(cache_file))
    except ERRORS as err:
        _fail(err)


# ----------------------------------------------------------------------------- scores
@cli.command("scores")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(), help="Also list the scores of this plugin file. Repeatable.")
@click.option("--arch", default=None, help="Also say, per score, whether this model serves it and why not (a random-weight copy is built and traced; nothing is downloaded). Same names as extract --arch.")
@click.option("--model-file", default=None, help="As --arch, for your own FILE.py:FUNC model.")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True, help="With --arch: classes of the head.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="With --arch: side of the square input the model is traced at (with --preprocess: its size override). [default: 224, or the preprocessing's]")
@click.option("--head", default=None, help="With --arch: module name of the linear head (as extract --head).")
@click.option("--output", "output", default=None, help="With --arch: the index or key of the logits in the model's output (as extract --output).")
@click.option("--preprocess", default=None, help="With --arch: trace at this preprocessing's input shape (its channels and size, as extract --preprocess) instead of 3 x --image-size.")
@click.option("--hook-set", "hook_sets", multiple=True, help="With --arch: hook-set overrides, as extract --hook-set.")
def list_scores(plugins, arch, model_file, num_classes, image_size, head, hook_sets, output=None, preprocess=None):
    """The registered scores: title, what each reads, what it is fitted on and the memory
    its fit needs, its parameters;
    with --arch, whether that model serves each one.

    \b
    Example:
      pipeline.py scores --arch torchvision:vit_b_16
    """
    _load_plugins(plugins)
    names = list(all_entries())
    if arch or model_file:
        stage = _extract_stage()
        try:
            rows, title = model_serving(stage, names, arch, model_file, num_classes, image_size, head, hook_sets,
                                        output, preprocess)
        except ERRORS as err:
            _fail(err)
        click.echo(title)
        click.echo(plain(["score", "title", "served", "backward objectives", "bytes/image"], [r[:5] for r in rows]))
        click.echo("bytes/image: the cache's size per image for the score alone (policy scores, the default "
                   "ODIN pass), before compression; every extraction has one forward pass, and each backward "
                   "objective stops at the earliest layer whose statistics it feeds")
        for name, _, served, _, _, why in rows:
            if why:
                click.echo(f"  {name}: {'not served: ' if served == 'no' else ''}{why}")
        return
    rows = []
    for name, e in all_entries().items():
        head = "" if not e.linear_head else ", head" if not callable(e.linear_head) else ", head (by parameters)"
        reads = ", ".join(f"{h}:{s}/{st}" for h, s, st in e.needs_for()) or f"logits, features{head}"
        reads += "".join(f" + {p} pass" for p in e.passes)
        rows.append([name, e.title, e.family, reads, e.fit_on or "-", e.fit_memory or "-",
                     "yes" if e.default else "", ", ".join(e.params) or "-", e.reference or "-"])
    click.echo(plain(["score", "title", "family", "reads", "fitted on", "fit memory", "default", "parameters",
                      "reference"], rows))
    click.echo(f"{len(rows)} scores")
    click.echo("fit memory: what a fit holds beside one block of the fitting cache (n fitting rows, "
               "D features, K classes, C channels, M intervals; float64 entries unless the score says)")


def model_refusals(names, params, adapter):
    """``{score: [reason]}`` of the scores in ``names`` (with ``params``, ``{score:
    {parameter: value}}``) that the model of ``adapter`` (``extract.adapters``) cannot
    serve: the hook sets and passes it cannot record (``unserved``), else the model itself
    (the entry's ``model_problem``: no linear head, its ``defined_on``). The one place that
    joins what a score reads (analysis) with what a model has (extraction): ``scores``
    prints it, ``extract`` applies it (``ExtractConfig.refusals``)."""
    from gradood.extract.adapters.serves import model_attrs, unserved
    out = {}
    for name in names:
        needs, passes = requirements([name], params)
        reasons = unserved(adapter, needs, passes)
        if not reasons:
            attrs = model_attrs(adapter, needs)
            why = entry(name).model_problem((params or {}).get(name), attrs)
            reasons = [why] if why else []
        if reasons:
            out[name] = reasons
    return out


def model_serving(stage, names, arch, model_file, num_classes, image_size, head=None, hook_sets=(), output=None,
                  preprocess=None):
    """``(rows, title)``: per score in ``names`` ``[name, title, "yes" | "no", backward
    objectives, bytes per image, reason or note]`` on a random-weight copy of the model,
    traced at the input shape of ``preprocess`` or at 3 x ``image_size`` (default 224) (the
    costs of the score extracted alone:
    ``extract.cli_support.extraction_cost``); ``stage``: ``extract.cli_support``; the
    refusals are ``model_refusals``."""
    from gradood.extract.adapters import adapter_for
    from gradood.extract.adapters.serves import model_attrs
    model = stage.build_model(arch, num_classes, model_file, output)
    shape = stage.input_shape(preprocess, image_size, model)
    adapter = adapter_for(model, shape, head, parse_hook_sets(hook_sets))
    stage.check_num_classes(adapter.num_classes, num_classes, model_file)
    refused = model_refusals(names, {}, adapter)
    rows = []
    for name in names:
        e = entry(name)
        needs, passes = requirements([name])
        reasons = refused.get(name, [])
        note = ""
        if not reasons and e.describe:
            attrs = model_attrs(adapter, needs)
            try:        # a description of the model's layers; others read cache parts
                note = e.describe(e.resolve(), attrs)
            except (KeyError, TypeError, ValueError, CacheError):
                note = ""
        cost = None if reasons else stage.extraction_cost(model, adapter, shape, needs, passes)
        objectives = ", ".join(cost[0]) or "-" if cost else "-"
        size = f"{cost[1]:,}" if cost else ("needs --maha-fit" if not reasons else "-")
        rows.append([name, e.title, "no" if reasons else "yes", objectives, size, "; ".join(reasons) or note])
    title = (f"{stage.canonical_arch(arch, model_file)} ({type(model).__name__}, adapter "
             f"{adapter.family}): head {head_label({'head': adapter.head_name})}, "
             f"{adapter.feature_dim} features{'' if adapter.head_name else ' from ' + adapter.features.module}, "
             f"traced at {'x'.join(map(str, shape))}")
    return rows, title


# ----------------------------------------------------------------------------- demo
@cli.command()
@click.option("--data-root", default="data/demo", show_default=True)
@click.option("--checkpoint", default="checkpoints/demo_resnet18.pt", show_default=True, help="Trained at first use, reused afterwards.")
@click.option("--cache-dir", default="caches/demo-resnet18", show_default=True)
@click.option("--results", "results_dir", default="results/demo-resnet18", show_default=True)
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Training seed of the demo classifier (its initialisation and data order): `make demo-seeds` trains seeds 0, 1, 2 into their own checkpoints and cache folders.")
@click.option("--extract-only", is_flag=True, help="Stop after extraction (no analyze, no sweep).")
def demo(data_root, checkpoint, cache_dir, results_dir, device, batch_size, seed=0, extract_only=False):
    """The whole pipeline on the embedded offline benchmark (sklearn digits vs generated OOD sets)."""
    cli_support = _extract_stage()
    start = time.time()
    try:
        times = cli_support.demo_command(data_root, checkpoint, cache_dir, device, batch_size,
                                         requirements(default_scores()), requirements(training_scores()),
                                         log=click.echo, seed=seed)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except ERRORS as err:
        _fail(err)
    if extract_only:
        click.echo("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        return
    ctx = click.get_current_context()
    t0 = time.time()
    ctx.invoke(analyze, bench="demo", cache_dir=cache_dir, results_dir=results_dir, scores=("all",),
               param_items=(), plugins=(), fit_on=None, convention="sklearn", plots=True)
    times["analyze"] = time.time() - t0
    click.echo("")
    t0 = time.time()
    ctx.invoke(sweep, bench="demo", cache_dir=cache_dir, results_dir=os.path.join(results_dir, "sweep"),
               grids=(), grid_file=None, plugins=(), fit_on=None, select_on=None, rank_by="FPR95",
               workers=None, top=15, plots=True)
    times["sweep"] = time.time() - t0
    click.echo("\nstage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
               + f"; total {time.time() - start:.1f} s")


if __name__ == "__main__":
    cli()
