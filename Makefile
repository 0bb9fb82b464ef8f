.PHONY: all test
all:
	cargo build --release
test:
	cargo test --workspace
