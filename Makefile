# One-command set-up: `make demo` runs the main job on the embedded default, `make test` the suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; on a GPU machine: make TORCH_SPEC="torch==2.13.0" (CUDA wheel index)
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup browser demo lint test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,judge]"
	touch $@

setup: $(VENV)/.installed

# The embedded default: the packaged tiny-prior config and the built-in demo identities.
demo: setup
	$(VENV)/bin/pv-ray personalize --output $(OUT)/personalize --workers 2

# The web page's test drives Debian's Chromium through its ChromeDriver (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint browser
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q --durations=25

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
