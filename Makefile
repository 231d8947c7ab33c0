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

# Pillow-SIMD, opt-in (cluster/pillow_simd.sh says how and why): `make simd` swaps Pillow for a
# Pillow-SIMD build (AVX2 where the CPU has it) in $(VENV), `make unsimd` puts Pillow back.
# `make simd-venv` builds $(SIMD_VENV): Pillow-SIMD over $(VENV)'s packages (no second torch), for
# benchmarks/multicrop.py and `make test-simd` (decode/crop/augment tests on Pillow-SIMD; CI runs it).
SIMD_VENV ?= .venv-simd
.PHONY: simd unsimd simd-venv test-simd

simd: venv
	bash cluster/pillow_simd.sh install $(VENV)

unsimd:
	bash cluster/pillow_simd.sh remove $(VENV)

simd-venv: venv
	bash cluster/pillow_simd.sh overlay $(VENV) $(SIMD_VENV)

test-simd: simd-venv
	SEER_EXPECT_PILLOW_SIMD=1 $(SIMD_VENV)/bin/python -m pytest -q tests/test_decode.py tests/test_crops_augment.py tests/test_pillow_simd.py
