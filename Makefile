# Two commands on a fresh machine: `make demo` and `make test`. Every target installs first.
# SCORE: for extract, the scores the caches must serve (default: every default score);
# for analyze, the scores to compute (default: all the caches can serve).
PY        := .venv/bin/python
BENCHMARK ?= demo
ARCH      ?= resnet18
# MODEL_FILE: your own model, FILE.py:FUNC (FUNC(num_classes) returns an nn.Module), instead of ARCH
MODEL_FILE ?=
DATASET   ?= all
SCORE     ?=
POLICY    ?= scores
# OVERWRITE=1: replace existing caches (extract --overwrite)
OVERWRITE ?=
CHECKPOINT ?= checkpoints/$(BENCHMARK)_$(subst :,-,$(ARCH)).pt
DATA_ROOT ?= data/$(BENCHMARK)
CACHE_DIR ?= caches/$(BENCHMARK)-$(subst :,-,$(ARCH))
DEVICE    ?= auto
BATCH_SIZE ?=
METRICS   ?= sklearn
NPROC     ?= 1
# NPROC > 1: one process per GPU (or CPU share) on this machine, launched by torchrun.
EXTRACT_LAUNCH = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PY))

GRID      ?=
GRID_FILE ?=
SELECT_ON ?=

.PHONY: install browser demo demo-seeds extract analyze sweep test bench model-table bench-scale bench-peers clean

install: .venv/.installed

# constraints.txt pins every package to the versions this repository was tested with;
# setup.cfg states the ranges a researcher's environment may satisfy instead.
.venv/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[extract,timm,test,plots]'
	touch $@

demo: install
	$(PY) pipeline.py demo

# Three seeds of the demo classifier, each in its own checkpoint and cache folder, then
# one table of mean ± std over them with a deep-ensemble row (its measured time: docs/metrics.md).
SEEDS ?= 0 1 2
demo-seeds: install
	for s in $(SEEDS); do $(PY) pipeline.py demo --seed $$s --extract-only \
	  --checkpoint checkpoints/demo_resnet18_s$$s.pt --cache-dir caches/demo-resnet18-s$$s || exit 1; done
	$(PY) pipeline.py analyze --benchmark demo --results results/demo-seeds \
	  --checkpoint-dirs $(subst $(eval) ,,$(foreach s,$(SEEDS),caches/demo-resnet18-s$(s),))

extract: install
	$(EXTRACT_LAUNCH) pipeline.py extract --benchmark $(BENCHMARK) $(if $(MODEL_FILE),--model-file $(MODEL_FILE),--arch $(ARCH)) --checkpoint $(CHECKPOINT) \
	  --data-root $(DATA_ROOT) --cache-dir $(CACHE_DIR) --dataset $(DATASET) \
	  --device $(DEVICE) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) --policy $(POLICY) $(if $(SCORE),--score $(SCORE)) \
	  $(if $(OVERWRITE),--overwrite)

analyze: install
	$(PY) pipeline.py analyze --benchmark $(BENCHMARK) --arch $(ARCH) --cache-dir $(CACHE_DIR) \
	  --score $(or $(SCORE),all) --metrics $(METRICS)

sweep: install
	$(PY) pipeline.py sweep --benchmark $(BENCHMARK) --arch $(ARCH) --cache-dir $(CACHE_DIR) \
	  $(if $(GRID),--grid '$(GRID)') $(if $(GRID_FILE),--grid-file $(GRID_FILE)) \
	  $(if $(SELECT_ON),--select-on $(SELECT_ON))

# The browser test (tests/test_report.py) renders the HTML report in Debian's headless
# chromium through chromedriver: installed with apt when missing (as root, as in CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  apt-get install -y -q chromium chromium-driver >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)

# two pytest-xdist workers, one thread each, a module at a time (tests/conftest.py)
test: install browser
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

bench: install
	$(PY) bench/run.py
	$(PY) bench/models.py
	$(PY) bench/ci.py

# docs/model_table.md: which scores each tried model serves (bench/model_table.py)
model-table: install
	$(PY) bench/model_table.py

bench-scale: install
	$(PY) bench/scale.py

# The newer detectors against OpenOOD's and pytorch-ood's own code, per sample (after
# `make demo`): OPENOOD=a checkout of Jingkang50/OpenOOD; SITE=a folder holding statsmodels
# and pytorch-ood (pip install --target SITE --no-deps statsmodels patsy pytorch-ood).
bench-peers: install
	$(PY) bench/peers.py --openood $(OPENOOD) $(if $(SITE),--site $(SITE))

clean:
	rm -rf caches results .pytest_cache
