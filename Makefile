# Two commands a new user needs: `make demo` and `make test`. Both set up everything they use,
# idempotently: the virtual environment, pinned Python packages, local service binaries.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test services-install services-down system-packages dashboard chromium dist constraints clean

# setuptools and wheel: tests/integration/test_package.py builds the wheel with them (no build isolation).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,torch]"
	touch $(STAMP)

services-install: $(STAMP)
	$(BIN)/tensordb services install

# kcat is the non-Python Kafka client the tests publish with; docker-compose (1.x, no engine needed)
# validates docker-compose.yml in tests/unit/test_compose.py (Debian packages).
system-packages:
	@command -v kcat >/dev/null || sh .ci/apt-install kcat
	@command -v docker-compose >/dev/null || sh .ci/apt-install docker-compose
	@command -v openssl >/dev/null || sh .ci/apt-install openssl

# The dashboard's front end: uPlot from npm (package-lock.json), our ES modules copied next to it
# into dashboard/static (git-ignored), which `tensordb dashboard` serves. Rebuilt when a source changes.
WEB := dashboard/web
$(WEB)/node_modules/.package-lock.json: $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js and npm (Debian: sh .ci/apt-install nodejs npm)" >&2; exit 1; }
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

dashboard/static/.built: $(WEB)/node_modules/.package-lock.json $(WEB)/build.mjs $(wildcard $(WEB)/src/*)
	cd $(WEB) && npm run --silent build
	touch $@

dashboard: dashboard/static/.built

# The wheel and the sdist in dist/; both carry the built front end, so it is built first.
dist: $(STAMP) dashboard
	$(BIN)/python -m build --outdir dist .

# Debian's Chromium, which the dashboard's browser tests drive through Playwright (no browser download).
chromium:
	@test -x /usr/bin/chromium || sh .ci/apt-install chromium

demo: services-install dashboard
	$(BIN)/tensordb services up
	$(BIN)/tensordb demo

test: services-install system-packages dashboard chromium
	$(BIN)/ruff check tensordb streams workers schemas tests bench examples dashboard
	$(BIN)/ruff format --check tensordb streams workers schemas tests bench examples dashboard
	$(BIN)/lint-imports
	$(BIN)/mypy tensordb streams workers dashboard
	$(BIN)/python -m pytest -q -ra

services-down: $(STAMP)
	$(BIN)/tensordb services down

constraints: $(STAMP)
	(echo "# Pinned versions of every Python dependency; regenerate with: make constraints"; \
	 $(BIN)/python -m pip freeze --exclude-editable | grep -v -E "^(pip|setuptools|wheel)==" | sort -f) > constraints.txt

clean: services-down
	rm -rf $(VENV) .tensordb dashboard/static $(WEB)/node_modules dist build
