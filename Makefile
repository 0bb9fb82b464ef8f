# stordom: build, run, test.
#   make run    boot stordom under bare QEMU with the embedded default job
#   make test   host unit tests, lints, and bare-QEMU boot tests
KERNEL := target/x86_64-unknown-linux-gnu/release/stordom
CMDLINE ?= loglevel=info
MODULE ?= target/demo-module.img

.PHONY: all build run test test-host test-boot lint bench clean

all: build

build:
	cargo build --release --bin stordom
	@echo "stordom ELF: $(KERNEL) ($$(stat -c %s $(KERNEL)) bytes)"

$(MODULE):
	@mkdir -p $(dir $@)
	head -c 1048576 /dev/urandom > $@

# 33 is the debug-exit device's "success" (see images/bare/qemu.sh).
run: build $(MODULE)
	@CMDLINE="$(CMDLINE)" images/bare/qemu.sh $(KERNEL) -initrd $(MODULE); \
	status=$$?; if [ $$status -eq 33 ]; then echo "stordom exited cleanly"; else echo "stordom failed (QEMU status $$status)"; exit 1; fi

test: lint test-host test-boot

test-host:
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-boot: build
	python3 tests/boot.py $(KERNEL)

# Disk benchmark on QEMU's emulated NVMe, AHCI and virtio-blk (TCG: the
# figures are ceilings for later comparisons in the same run, not hardware).
bench: build
	python3 tests/bench.py $(KERNEL)

clean:
	cargo clean
