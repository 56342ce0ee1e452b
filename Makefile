# Two commands on a fresh machine: `make demo` and `make test` (then `make demo-tasks` for every task).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: demo demo-tasks test venv data clean

venv: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

data: venv  # itm_test.json: data of an older layout is rebuilt
	@test -f data/demo/itm_test.json || $(PY) scripts/prepare_demo_data.py --out data/demo

demo: venv data
	$(PY) scripts/demo.py

# Fine-tunes every task from the demo checkpoint (made first if missing) and from no pretraining.
demo-tasks: venv data
	@test -f output/demo_pretrain/checkpoint_last.pth || $(PY) scripts/demo.py
	$(PY) scripts/demo_tasks.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf output data/demo
