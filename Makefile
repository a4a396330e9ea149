# The two commands a newcomer needs (Debian, as root): `make demo` and `make test`.
# Each installs what it needs: apt packages, a virtualenv, the package with its test extras.

VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := debootstrap openssh-client python3 python3-venv util-linux dpkg procps iproute2
# The tests start their own throw-away PostgreSQL cluster (the team state backend) from Debian's server, watch
# the live view on a real terminal (tmux), read the web pages in a real browser (chromium, by its driver), and
# start sshd processes of their own on loopback as bench/scale.py does (openssh-server's binary: the tests never
# use the system's ssh service).
TEST_APT_PACKAGES := postgresql tmux chromium chromium-driver openssh-server
PYTHON ?= python3
# The lab tests mostly wait on real hosts: spread over processes (each lab has its own subnet), 2 cores run 6;
# an idle process takes tests from a busy one's queue (worksteal), so a long test never ends the run alone.
TEST_WORKERS ?= 6

.PHONY: demo test deps lint lab-down docs dist

deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/acme-steps/pyproject.toml
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q -e examples/acme-steps  # the example step package (docs/writing-steps.md), tested by make test
	touch $@

test: deps
	@dpkg -s $(TEST_APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TEST_APT_PACKAGES); }
	$(BIN)/ruff check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

docs: deps
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: deps
	$(BIN)/overhaul lab.up
	$(BIN)/overhaul verify --env lab
	$(BIN)/overhaul upgrade --env lab --version 1.1.0 --yes
	$(BIN)/overhaul verify --env lab

lint: deps
	$(BIN)/ruff check .

lab-down: deps
	$(BIN)/overhaul lab.down

# `make dist`: a wheel and an sdist of Overhaul in $(DIST)/, to install outside the checkout (docs/quickstart.md).
# It needs a virtualenv with `build`, not the test dependencies. The wheel is built from the sdist, so a file the
# sdist leaves out is missing from the wheel too (and seen). Older builds are removed first: the Quickstart's
# `pip install dist/overhaul-*.whl` must match one wheel.
DIST ?= dist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

dist: $(BIN)/python
	$(BIN)/pip install -q build
	rm -f $(DIST)/overhaul-*.whl $(DIST)/overhaul-*.tar.gz
	$(BIN)/python -m build --outdir $(DIST) .
