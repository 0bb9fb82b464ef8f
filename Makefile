# stordom: build, run, test.
#   make run        stordom serving a RAM disk to a Linux guest under Xen (in QEMU)
#   make test       lints, host unit tests, bare-QEMU boot tests, Xen scenarios
#   make run-bare   boot stordom alone under bare QEMU and exit (BOOT=efi: by GRUB's
#                   multiboot2 loader under OVMF instead of the PVH entry)
#   make bench      disk benchmarks: the host engine; bare-QEMU drivers; stordom vs dom0's
#                   blkback vs a Linux driver domain (RAM disks, NVMe); memory to serve 8 vbds;
#                   stordom over NBD vs dom0's blkback over Linux's nbd client
#   make bench-engine  the blkback engine on the host: requests/s and allocations per request
#   make soak       3 guests + attach/detach churn on stordom for SOAK_SECS (1800)
#   make hostile    the hostile blkfront vs stordom under Xen, with a bystander guest
#   make fuzz       the host fuzz tests, each for FUZZ_SECS (200; ~20 min in all), then
#                   the hostile campaign under Xen at FUZZ_HOSTILE_COUNT requests (10^6; ~50 min)
KERNEL := target/x86_64-unknown-linux-gnu/release/stordom
GNTSHARE := target/x86_64-unknown-linux-gnu/release/gntshare
HOSTILE_FRONT := target/x86_64-unknown-linux-gnu/release/hostile-front
# stordom in GRUB's EFI image (multiboot2), for HVM stordom under OVMF.
STORDOM_EFI := target/stordom.efi
# Scenarios under real Xen (nested in QEMU), in the order `make test` runs them.
SCENARIOS ?= baseline xen-guest stordom-disk hvm-stordom hardware partitions attach-cycles guest-reboot \
	stordom-two-guests hostile compare soak restart net nbd
SOAK_SECS ?= 1800
FUZZ_SECS ?= 200
HOSTILE_COUNT ?= 20000
FUZZ_HOSTILE_COUNT ?= 1000000
ENGINE_BENCH_JSON ?= runs/engine-bench.json
XEN_ENV = STORDOM_ELF=$(abspath $(KERNEL)) GNTSHARE=$(abspath $(GNTSHARE)) \
	HOSTILE_FRONT=$(abspath $(HOSTILE_FRONT)) STORDOM_EFI=$(abspath $(STORDOM_EFI))
CMDLINE ?= loglevel=info
BOOT ?= pvh
MODULE ?= target/demo-module.img

.PHONY: all build run run-ram run-bare test test-host test-boot test-xen images lint bench bench-engine soak hostile fuzz clean

all: build

build:
	cargo build --release -p kernel --bin stordom
	cargo build --release -p gntshare
	cargo build --release -p hostile-front
	@echo "stordom ELF: $(KERNEL) ($$(stat -c %s $(KERNEL)) bytes)"

$(MODULE):
	@mkdir -p $(dir $@)
	head -c 1048576 /dev/urandom > $@

# stordom's main job: Xen (nested in QEMU) boots dom0 and stordom as an HVM
# storage driver domain owning the NVMe and AHCI controllers passed through
# to it; a stock Linux guest whose disk is namespace 1 of that NVMe checks
# its data and measures it. stordom's console is printed. `make run-ram`:
# the PVH stordom serving a RAM disk instead.
run: RUN_SCENARIO = nvme-disk
run-ram: RUN_SCENARIO = stordom-disk
run run-ram: build images
	@$(XEN_ENV) python3 images/run.py $(RUN_SCENARIO) --no-build --retries 2; status=$$?; \
	run=$$(ls -td runs/*-$(RUN_SCENARIO) | head -1); \
	echo "--- stordom's console ($$run/guest-stordom.log) ---"; cat $$run/guest-stordom.log; exit $$status

# 33 is the debug-exit device's "success" (see images/bare/qemu.sh).
run-bare: build $(MODULE) $(if $(filter efi,$(BOOT)),images)
	@CMDLINE="$(CMDLINE)" BOOT=$(BOOT) MODULES=$(MODULE) images/bare/qemu.sh $(KERNEL) \
		$(if $(filter pvh,$(BOOT)),-initrd $(MODULE)); \
	status=$$?; if [ $$status -eq 33 ]; then echo "stordom exited cleanly"; else echo "stordom failed (QEMU status $$status)"; exit 1; fi

test: lint test-host test-boot test-xen

test-host:
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The EFI cases need GRUB and OVMF from the pinned packages (make images).
test-boot: build images
	python3 tests/boot.py $(KERNEL)

# Install host tools, fetch the Debian packages, build Xen/dom0/guest images
# (cached in images/cache), and stordom's GRUB EFI image.
images: build
	$(MAKE) --no-print-directory -C images build
	images/bare/efi.sh $(KERNEL) $(STORDOM_EFI) ""

test-xen: build images
	python3 images/test_run.py
	$(XEN_ENV) python3 images/suite.py $(SCENARIOS)

# The host engine benchmark (bench-engine, below), then the disk benchmark
# on QEMU's emulated NVMe, AHCI and virtio-blk (TCG: the figures are
# ceilings for later comparisons in the same run, not hardware) and
# stordom vs dom0's blkback under Xen.
bench: bench-engine build images
	@mkdir -p runs
	python3 tests/bench.py $(KERNEL) --json runs/bench-bare.json
	$(XEN_ENV) python3 images/run.py compare --no-build --retries 2
	run=$$(ls -td runs/*-compare | head -1); python3 images/compare.py $$run/results.json --json $$run/table.json
	$(XEN_ENV) python3 images/run.py compare-nvme --no-build --retries 2
	run=$$(ls -td runs/*-compare-nvme | head -1); python3 images/compare.py $$run/results.json \
		--bare runs/bench-bare.json --bare-disk nvme0n1 --json $$run/table.json
	$(XEN_ENV) python3 images/run.py footprint --no-build --retries 2
	run=$$(ls -td runs/*-footprint | head -1); python3 images/compare.py $$run/results.json --json $$run/table.json
	$(XEN_ENV) python3 images/run.py compare-nbd --no-build --retries 2
	run=$$(ls -td runs/*-compare-nbd | head -1); python3 images/compare.py $$run/results.json --json $$run/table.json

# The ring engine on the host, no emulator: the simulated blkfront and Xen
# against a vbd over a null disk, all on one core; requests per second and
# heap allocations per request for 4 KiB and 1 MiB requests, direct and
# indirect, persistent grants on and off. The table is printed and written
# as JSON to ENGINE_BENCH_JSON. (`cargo test` guards the allocations.)
bench-engine:
	@mkdir -p $(dir $(ENGINE_BENCH_JSON))
	STORDOM_ENGINE_BENCH_JSON=$(abspath $(ENGINE_BENCH_JSON)) cargo test --release -p blkback \
		--lib tests::engine_benchmark::engine_benchmark -- --exact --ignored --nocapture

# The soak scenario at full length (make test runs it for 180 s).
soak: build images
	$(XEN_ENV) python3 images/run.py soak --no-build --retries 2 \
		--env SOAK_SECS=$(SOAK_SECS) --timeout $$(( $(SOAK_SECS) + 600 ))

# The hostile frontend against stordom under Xen, with a bystander guest
# (images/scenarios/hostile), alone; `make test` runs it too.
hostile: build images
	$(XEN_ENV) python3 images/run.py hostile --no-build --retries 3 \
		--env HOSTILE_COUNT=$(HOSTILE_COUNT)

# The host fuzz tests (`cargo test` runs each briefly) for FUZZ_SECS each,
# two at a time: ring engine, blkif parsing, xenstore wire and client,
# xenstore churn after connect, hvm_start_info. Each prints its seed;
# FUZZ_SEED=<seed> replays one. Then the hostile scenario with its random
# campaign at FUZZ_HOSTILE_COUNT requests (about 400 a second under
# nested TCG), the bystander guest under attack throughout (ATTACKED_SECS
# sized to the campaign), no rerun.
fuzz: build images
	STORDOM_FUZZ_SECS=$(FUZZ_SECS) $(if $(FUZZ_SEED),STORDOM_FUZZ_SEED=$(FUZZ_SEED)) \
		cargo test --workspace fuzz_ -- --nocapture --test-threads 2
	$(XEN_ENV) python3 images/run.py hostile --no-build --retries 0 \
		--env HOSTILE_COUNT=$(FUZZ_HOSTILE_COUNT) \
		--env ATTACKED_SECS=$$(( $(FUZZ_HOSTILE_COUNT) / 400 + 60 )) \
		--timeout $$(( $(FUZZ_HOSTILE_COUNT) / 250 + 900 ))

clean:
	cargo clean
