# Makefile
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PYTHON) src/run.py

# two workers, each test file on one of them (its module fixtures run once)
test: $(INSTALLED)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs multirun
