# Two commands a fresh machine needs (see README): `make quickstart` and `make test`.
# Both create the virtual environment $(VENV), install the project into it and run.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
CONSTRAINTS = -c requirements/constraints.txt
export MAX_JOBS ?= 2

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

.PHONY: install install-test quickstart test
install: $(VENV)/bin/python
	$(PIP) install -q -r requirements/build.txt $(CONSTRAINTS)
	$(PIP) install -q --no-build-isolation -e ".[train]" $(CONSTRAINTS)

install-test: $(VENV)/bin/python
	$(PIP) install -q -r requirements/build.txt $(CONSTRAINTS)
	$(PIP) install -q --no-build-isolation -e ".[train,test]" $(CONSTRAINTS)

quickstart: install
	$(PY) train_cifar.py --preset digits-smoke --weighting vaw --out runs/quickstart --overwrite

test: install-test
	$(PY) -m pytest python_tests -q
