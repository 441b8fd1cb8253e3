# Hausmeister — the two commands of the README, and what they build on.
#   make run    install everything and run the server on its embedded defaults (SQLite, own CA,
#               loopback only); prints the console/module ports and the first admin's password
#   make test   install everything the tests need (apt and pip) and run the whole test suite
#   make bundle the offline bundle dist/hausmeister-<version>-offline.tar for an air-gapped
#               Debian 12 (wheels and .debs from the registries; signed with the release key
#               in $(HAUSMEISTER_RELEASE_KEY), see packaging/README.md)
# Needs root (apt-get) on a fresh Debian 12; only the package registries must be reachable.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
APT     = DEBIAN_FRONTEND=noninteractive apt-get
# postgresql: the throwaway cluster the tests start; haproxy: the relay benchmark's peer;
# Xvfb, xterm, x11vnc, vncsnapshot, TigerVNC: real displays and real VNC peers for screen tests.
# chromium: the browser Playwright drives in the console tests (never `playwright install`).
# slapd, ldap-utils: a real OpenLDAP the directory sign-in tests start on 127.0.0.1 (no system
# service: debconf is told not to configure one). tinyproxy: the HTTP CONNECT proxy modules go through.
# npm: installs the pinned axe-core the accessibility test runs (tests/test_console_a11y.py).
# sway, wayvnc, foot: a headless Wayland desktop served by a real local VNC server, the screen source
# of tests/test_e2e_vnc_screen.py (a host's --screen vnc://127.0.0.1:PORT); tigervnc-scraping-server:
# TigerVNC's x0vncserver as another local VNC server (tests/test_capture_vnc.py).
# libxcb-keysyms1, libxcb-icccm4: Qt's xcb platform for the customer one-file on Xvfb (PyInstaller
# bundles the xcb libraries it finds at build time).
TEST_APT_PACKAGES = postgresql haproxy xvfb xterm x11vnc vncsnapshot tigervnc-viewer xfonts-base xclip chromium npm slapd ldap-utils tinyproxy libxcb-keysyms1 libxcb-icccm4 sway wayvnc foot tigervnc-scraping-server
TEST_BINARIES = /usr/lib/postgresql/*/bin/initdb /usr/sbin/haproxy /usr/bin/Xvfb /usr/bin/xterm /usr/bin/x11vnc /usr/bin/vncsnapshot /usr/bin/xtigervncviewer /usr/bin/xclip /usr/bin/chromium /usr/bin/npm /usr/sbin/slapd /usr/bin/ldapadd /usr/bin/tinyproxy /usr/lib/x86_64-linux-gnu/libxcb-keysyms.so.1 /usr/lib/x86_64-linux-gnu/libxcb-icccm.so.4 /usr/bin/sway /usr/bin/swaymsg /usr/bin/wayvnc /usr/bin/foot /usr/bin/x0vncserver

.PHONY: run test install test-system-packages clean-run bundle translations

run: install
	$(VENV)/bin/hausmeister-server --config config/local.toml run

# Test files run in parallel, one worker per core (a file's tests stay on one worker, so its
# module-scoped servers start once); every fixture picks free ports, displays and temp folders.
TEST_WORKERS ?= 2

test: install test-system-packages
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { $(APT) update -qq && $(APT) install -y -qq python3 python3-venv python3-pip; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Debian packages the tests run for real (all on 127.0.0.1; the system PostgreSQL is never used).
test-system-packages:
	@ls $(TEST_BINARIES) >/dev/null 2>&1 || { echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections; $(APT) update -qq && $(APT) install -y -qq --no-install-recommends $(TEST_APT_PACKAGES); }

bundle: install
	@$(APT) update -qq
	$(PY) packaging/build_bundle.py --key "$(HAUSMEISTER_RELEASE_KEY)" $(BUNDLE_ARGS)

clean-run:
	rm -rf var certs/ca.* certs/server.*

# The console's and the mails' German catalogue: extract the messages, merge them into the .po
# (then translate the new ones), compile the .mo.  Both files are committed and shipped.
translations: install
	$(VENV)/bin/pybabel extract -F babel.cfg -k N_ -k Text -k Plural:1,2 --no-location --sort-output --project=Hausmeister -o server/locale/messages.pot .
	$(VENV)/bin/pybabel update -i server/locale/messages.pot -d server/locale -D messages --width 100 --ignore-obsolete
	$(VENV)/bin/pybabel compile -d server/locale -D messages --statistics
