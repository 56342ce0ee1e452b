# Two commands on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: demo test venv data clean

venv: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

data: venv
	@test -f data/demo/pretrain.json || $(PY) scripts/prepare_demo_data.py --out data/demo

demo: venv data
	$(PY) scripts/demo.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf output data/demo
