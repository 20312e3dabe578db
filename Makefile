# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,
EXTRAS ?= all,test
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Until the batch job lands: a short real training on the bundled cells.
demo: install
	$(BIN)/smearscope train --data tests/fixtures/cells --out runs/demo --epochs 1 --steps-per-epoch 3 --batch-size 8
	@echo "demo outputs: runs/demo (model.keras, curves.png, confusion.png, metrics.json, split.json)"

clean:
	rm -rf $(VENV) build *.egg-info
