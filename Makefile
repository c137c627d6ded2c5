# ldm_lab: `make help` lists the targets. Everything runs inside .venv, which `install` creates.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install quickstart quickstart-class quickstart-text test test-fast test-parity lint bench gpu-check sweep-vae weights clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install ldm_lab with its dev tools (once; again when pyproject.toml changes)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	touch $(STAMP)

# The whole chain on the embedded synthetic data: first stage, latent cache, LDM, samples.
QUICKSTART_DIR := outputs/quickstart-$(shell date +%Y%m%d-%H%M%S)
quickstart: install ## tiny KL autoencoder -> latent cache -> tiny LDM -> samples and their FID, on the synthetic data (CPU, 10-23 min)
	$(BIN)/python run.py experiment=quickstart hydra.run.dir=$(QUICKSTART_DIR)/autoencoder
	$(BIN)/python run.py experiment=quickstart_ldm hydra.run.dir=$(QUICKSTART_DIR)/ldm \
		model.first_stage=$(QUICKSTART_DIR)/autoencoder/checkpoints/last.ckpt
	$(BIN)/python run.py experiment=quickstart_ldm task=evaluate hydra.run.dir=$(QUICKSTART_DIR)/evaluation \
		evaluate.model=$(QUICKSTART_DIR)/ldm/checkpoints/last.ckpt evaluate.num_samples=64
	@echo "sample grid: $(QUICKSTART_DIR)/ldm/samples/grid.png"
	@grep -ho "sample FID.*" $(QUICKSTART_DIR)/evaluation/run.log

# The class and text chains keep the 2400-step first stage their LDMs were measured with.
FIRST_STAGE_2400 := max_steps=2400 val_every_n_steps=600 model.loss.disc_start=2100

# The same chain, class-conditional: the synthetic data with 4 classes, guided samples, their class accuracy.
CLASS_DIR := outputs/quickstart-class-$(shell date +%Y%m%d-%H%M%S)
quickstart-class: install ## tiny autoencoder -> 4-class LDM -> guided samples per class, FID and class accuracy (CPU, ~20 min)
	$(BIN)/python run.py experiment=quickstart $(FIRST_STAGE_2400) data.source.num_classes=4 \
		hydra.run.dir=$(CLASS_DIR)/autoencoder
	$(BIN)/python run.py experiment=quickstart_class hydra.run.dir=$(CLASS_DIR)/ldm \
		model.first_stage=$(CLASS_DIR)/autoencoder/checkpoints/last.ckpt
	$(BIN)/python run.py experiment=quickstart_class task=evaluate hydra.run.dir=$(CLASS_DIR)/evaluation \
		evaluate.model=$(CLASS_DIR)/ldm/checkpoints/last.ckpt evaluate.num_samples=64
	@echo "sample grid (a row per class): $(CLASS_DIR)/ldm/samples/grid.png"
	@grep -ho "guidance [0-9.]*: class accuracy.*" $(CLASS_DIR)/evaluation/run.log

# The same chain, text-conditional: the captioned synthetic data, the scratch text encoder, prompts in; FID against
# its floor and prompt adherence (kind, count, colours read back) beside the shuffled-prompt chance and real images.
TEXT_DIR := outputs/quickstart-text-$(shell date +%Y%m%d-%H%M%S)
quickstart-text: install ## tiny autoencoder -> text LDM -> samples of prompts, FID and prompt adherence (CPU, ~25 min)
	$(BIN)/python run.py experiment=quickstart $(FIRST_STAGE_2400) data.source.captions=true data.source.num_images=2048 \
		hydra.run.dir=$(TEXT_DIR)/autoencoder
	$(BIN)/python run.py experiment=quickstart_text hydra.run.dir=$(TEXT_DIR)/ldm \
		model.first_stage=$(TEXT_DIR)/autoencoder/checkpoints/last.ckpt
	$(BIN)/python run.py experiment=quickstart_text task=evaluate hydra.run.dir=$(TEXT_DIR)/evaluation \
		evaluate.model=$(TEXT_DIR)/ldm/checkpoints/last.ckpt evaluate.num_samples=128
	@echo "sample grid (a row per prompt): $(TEXT_DIR)/ldm/samples/grid.png"
	@grep -ho "guidance [0-9.]*: prompt adherence.*" $(TEXT_DIR)/evaluation/run.log

test: install ## run the test suite (CPU, tiny models)
	$(BIN)/python -m pytest -q

test-fast: install ## the test suite without the 14 tests marked slow (subprocess jobs, DDP, overfitting, traced memory, compiling, the EMA sweep)
	$(BIN)/python -m pytest -q -m "not slow"

# oneDNN and ATen's vector kernels pick their code by CPU: the parity tests again with both capped at AVX2,
# as a CPU without AVX-512 or AMX computes (the CPU needs AVX2: a cap above what it has dies of SIGILL).
test-parity: install ## the parity tests against the original code, again as an AVX2 CPU computes them
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m parity

# The design card's sweep (lr x disc norm type, 8 jobs) on a short CPU budget: the tiny VAE, 60 steps each.
SWEEP_DIR := multirun/sweep-vae-$(shell date +%Y%m%d-%H%M%S)
sweep-vae: install ## 8-job lr x disc-norm sweep of the tiny VAE (short budget), then its report (table + plots)
	$(BIN)/python run.py sweep=vae model=vae_tiny max_steps=60 val_every_n_steps=20 model.loss.disc_start=30 \
		require_weights=false hydra.sweep.dir=$(SWEEP_DIR)
	$(BIN)/python run.py task=report sweep_dir=$(SWEEP_DIR)

bench: install ## benchmarks (data layer, stages, speed options, encoding by 1 and 2 processes, a step's breakdown and compile); tables in experiments/bench/results/
	$(BIN)/python experiments/bench/bench_data.py
	$(BIN)/python experiments/bench/bench_stages.py
	$(BIN)/python experiments/bench/bench_encoding.py
	$(BIN)/python experiments/bench/bench_step.py

gpu-check: install ## on a CUDA machine: task=plan vs real memory, images/s, bf16 peak, speed options -> experiments/gpu/
	$(BIN)/python experiments/gpu/gpu_check.py

lint: install ## ruff
	$(BIN)/ruff check run.py ldm_lab tests experiments

weights: install ## download the LPIPS (VGG16) and Inception weights into TORCH_HOME/hub/checkpoints
	$(BIN)/python -m ldm_lab.core.weights

clean: ## remove run outputs (outputs/, multirun/) and the generated synthetic data
	rm -rf outputs multirun data
