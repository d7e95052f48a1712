# Two commands a new user needs: `make demo` and `make test`. Both set up everything they use,
# idempotently: the virtual environment, pinned Python packages, local service binaries.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test services-install services-down system-packages constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

services-install: $(STAMP)
	$(BIN)/tensordb services install

# kcat is the non-Python Kafka client the tests publish with (Debian package).
system-packages:
	@command -v kcat >/dev/null || sh .ci/apt-install kcat

demo: services-install
	$(BIN)/tensordb services up
	$(BIN)/tensordb demo

test: services-install system-packages
	$(BIN)/ruff check tensordb streams workers schemas tests bench examples
	$(BIN)/python -m pytest -q -ra

services-down: $(STAMP)
	$(BIN)/tensordb services down

constraints: $(STAMP)
	(echo "# Pinned versions of every Python dependency; regenerate with: make constraints"; \
	 $(BIN)/python -m pip freeze --exclude-editable | grep -v -E "^(pip|setuptools|wheel)==" | sort -f) > constraints.txt

clean: services-down
	rm -rf $(VENV) .tensordb
