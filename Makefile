# Two commands do all the set-up on a fresh machine (each makes .venv when missing):
#   make demo   train if there is no model, serve it, score the test set through the server
#   make test   lint, type-check, build the docs and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
MODEL_DIR ?= models/mnist
export MNIST_PATH ?= $(abspath ../shared/data/mnist.npz)

.PHONY: demo test lint typecheck docs pytest proto openapi venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --model-dir $(MODEL_DIR) $(DEMO_ARGS)

test: lint typecheck docs pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# mypy cannot follow setuptools' editable-install finder, so it reads the packages
# through a throw-away tree of links that mirrors the installed names.
typecheck: $(STAMP)
	rm -rf .typecheck && mkdir -p .typecheck/mnist_serving
	for d in protos contract trainer server client; do ln -s ../../$$d .typecheck/mnist_serving/$$d; done
	MYPYPATH=.typecheck:. $(BIN)/mypy -p mnist_serving.protos -p mnist_serving.contract -p mnist_serving.trainer \
		-p mnist_serving.server -p mnist_serving.client -p tests -p bench
	MYPYPATH=.typecheck $(BIN)/mypy scripts/demo.py scripts/config_page.py

# The site (docs/, mkdocs.yml) into site/, offline; --strict fails on a broken link or anchor
# and on a page missing from the nav (never add --quiet: mkdocs then drops the warnings
# before --strict counts them, and a broken site builds). docs/operations/configuration.md is generated:
# $(BIN)/python scripts/config_page.py (tests/test_config_page.py says when it is stale).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

proto: $(STAMP)
	$(BIN)/python protos/generate.py

# docs/openapi.json: the HTTP port's OpenAPI document, as the server serves it.
openapi: $(STAMP)
	$(BIN)/python -m mnist_serving.server.api.openapi > docs/openapi.json

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache site
