# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,
EXTRAS ?= all,test
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install browser test test-fast demo web clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

# Debian's Chromium for the page's browser tests; where apt cannot run, those tests skip and say why.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the browser tests will skip"

test: install browser
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The suite without servers, clusters or training (tests marked slow): a quick loop while editing.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job with the embedded defaults (local Ray, embedded Triton) on the bundled smear fields.
demo: install
	$(BIN)/smearscope run --input tests/fixtures/smears --output runs/demo --overlays

# The web page on http://127.0.0.1:8080/ over an embedded Triton.
web: install
	$(BIN)/smearscope web

clean:
	rm -rf $(VENV) build *.egg-info
