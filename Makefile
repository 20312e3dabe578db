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

# The main job with the embedded defaults (local Ray, embedded Triton) on the bundled smear fields.
# Until a trained model is committed, a briefly trained stand-in is exported first (and says so).
MODEL_ONNX := model_repository/malaria_resnet50v2/1/model.onnx
DEMO_REPOSITORY := $(if $(wildcard $(MODEL_ONNX)),model_repository,runs/demo-repository)

demo: install
ifeq ($(DEMO_REPOSITORY),runs/demo-repository)
	@echo "NOTE: no trained model is committed yet: the demo uses a stand-in trained for 3 steps on the bundled cells."
	@echo "NOTE: its Parasitized/Uninfected calls are NOT meaningful; cell finding, Triton and Ray are real."
	@test -f runs/demo-repository/malaria_resnet50v2/1/model.onnx || { \
	  $(BIN)/smearscope train --data tests/fixtures/cells --out runs/demo-model --epochs 1 --steps-per-epoch 3 --batch-size 8 && \
	  $(BIN)/smearscope export --model runs/demo-model/model.keras --repository runs/demo-repository; }
endif
	$(BIN)/smearscope run --input tests/fixtures/smears --output runs/demo --repository $(DEMO_REPOSITORY) --overlays

clean:
	rm -rf $(VENV) build *.egg-info
