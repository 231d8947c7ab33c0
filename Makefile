# `make demo`: build .venv, install seer, run the quickstart end to end on real sample photos.
# `make test`: the whole test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
# pip on the dev/CI machines takes these from local disk; elsewhere any torch>=2.6 works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,demo]'
	touch $@

demo: venv
	$(PY) -m seer.demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_OUT) runs .pytest_cache
