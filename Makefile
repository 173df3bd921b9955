# WSSS with frozen CLIP: `make demo` (whole pipeline on the synthetic set, CPU) and `make test`.
# Every target installs what it needs first (`make setup`, idempotent through a stamp file).

SHELL := /bin/bash
.DEFAULT_GOAL := help

DATASET   ?= synthetic
HEAD      ?=
# Each head gets its own run directory unless RUN is given (a WeCLIP run and an ExCEL run never collide).
RUN       ?= $(or $(HEAD),default)
SCHEDULER ?= local
GPUS      ?= 1
SHARDS    ?=
MODEL     ?=
CONFIG_voc       := configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py
CONFIG_coco      := configs/stage1/weclip_vit-b16_coco14-320x320_80k.py
CONFIG_world     := configs/stage1/weclip_world-clip_synthetic-160x160_300i.py
CONFIG_synthetic := $(CONFIG_world)
CONFIG_weakclip_voc       := configs/stage1/weakclip_vit-b16_voc12aug-512x512_20k.py
CONFIG_weakclip_synthetic := configs/stage1/weakclip_world-clip_synthetic-160x160_1000i.py
CONFIG_excel_voc          := configs/stage1/excel_vit-b16_voc12aug-320x320_30k.py
CONFIG_excel_coco         := configs/stage1/excel_vit-b16_coco14-320x320_100k.py
CONFIG_excel_synthetic    := configs/stage1/excel_world-clip_synthetic-160x160_300i.py
CONFIG    ?= $(or $(CONFIG_$(HEAD)_$(DATASET)),$(CONFIG_$(DATASET)))
OVERWRITE ?= 0
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.wsss-installed
RUN_DIR    = runs/$(DATASET)/$(RUN)
# Synthetic configs load the in-repo world CLIP (clip.weights="world:default"): train it first (cached, a no-op after).
NEEDS_WORLD = $(if $(filter synthetic,$(DATASET)),world)
PYTEST_ARGS ?=
OPTIONS   ?=
S2_OPTIONS ?=
DESCRIPTIONS ?= $(RUN_DIR)/bank/descriptions.json
COMMON     = --config $(CONFIG) --run $(RUN) --scheduler $(SCHEDULER) --gpus $(GPUS) $(if $(OPTIONS),--cfg-options $(OPTIONS)) $(if $(filter 1,$(OVERWRITE)),--overwrite)

export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup test test-slow test-all data cams bank world demo pseudo-labels retrain report bench status cancel clean verify

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

$(STAMP): setup.cfg pyproject.toml tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	@touch $@

setup: $(STAMP)  ## create .venv and install the pinned stack (mmcv built once, wheel cached in ~/.cache/wsss-clip)

test: $(STAMP)  ## fast offline CPU tests (not slow)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## slow end-to-end tests (CI runs these too)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: test test-slow  ## both

data: $(STAMP)  ## generate (synthetic) or check (voc, coco) the dataset under $$WSSS_DATA_ROOT
	$(PY) -m stage1_cam.data --config $(CONFIG)

cams: $(STAMP) $(NEEDS_WORLD) data  ## initial CLIP CAMs for a split + their evaluation table
	$(PY) -m stage1_cam.cams $(CONFIG) --run $(RUN)

bank: $(STAMP) $(NEEDS_WORLD) data  ## ExCEL's attribute bank from DESCRIPTIONS={class: [sentences]}.json (synthetic: written from the generator)
	$(PY) -m stage1_cam.cams.bank $(CONFIG) --run $(RUN) --descriptions $(DESCRIPTIONS) $(if $(filter synthetic,$(DATASET)),--write-synthetic) $(if $(OPTIONS),--cfg-options $(OPTIONS))

world: $(STAMP)  ## tiny CLIP trained on the synthetic world, cached under $$WSSS_CACHE/world (default ~/.cache/wsss-clip)
	$(PY) -m stage1_cam.world_clip --config $(CONFIG_world)

pseudo-labels: $(STAMP) $(NEEDS_WORLD)  ## stage 1: train the head (if no checkpoint), dump shards, manifest, evaluate
	$(PY) -m pipelines pseudo-labels $(COMMON) $(if $(SHARDS),--shards $(SHARDS)) $(if $(HEAD),--head $(HEAD))

retrain: $(STAMP) $(NEEDS_WORLD)  ## stage 2: MMSegmentation on the shards, evaluated on val (stage-2 overrides: S2_OPTIONS; OPTIONS that differ from the run's are refused)
	$(PY) -m pipelines retrain $(COMMON) $(if $(MODEL),--model $(MODEL)) $(if $(S2_OPTIONS),--s2-options $(S2_OPTIONS))

report: $(STAMP)  ## one report: pseudo-mask quality, retrained model, cost, environment
	$(PY) -m pipelines report $(COMMON)

demo: $(STAMP) world  ## world CLIP, then initial CAMs + pseudo-labels + retrain + report on the synthetic set, on CPU
	$(MAKE) --no-print-directory cams pseudo-labels retrain report DATASET=synthetic RUN=demo SCHEDULER=local

bench: $(STAMP)  ## benchmarks: print and save JSON figures under bench/results/
	$(PY) -m tools.bench --out bench/results

verify: $(STAMP)  ## check a run's shards against their sha256 (rebuilds a stale manifest; QUICK=1: changed files only)
	$(PY) -m stage1_cam.io.verify $(RUN_DIR)/pseudo_masks $(if $(filter 1,$(QUICK)),--quick)

status: $(STAMP)  ## show a run's jobs and shards
	$(PY) -m pipelines status $(COMMON)

cancel: $(STAMP)  ## cancel a run's SLURM jobs
	$(PY) -m pipelines cancel $(COMMON)

clean:  ## remove caches and test outputs (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
