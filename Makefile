# The two commands of the README. Each installs what it needs first (scripts/bootstrap).
INVOKE := .venv/bin/invoke

.PHONY: lab test bootstrap unit

## Build the lab's throwaway hosts, deploy a full tower onto them, verify it (the main job).
lab: bootstrap
	$(INVOKE) lab

## Everything CI runs: unit tests, then a full lab tower built, deployed, verified, torn down.
test: bootstrap
	$(INVOKE) test

## Unit, deploy and local integration tests only (no lab).
unit: bootstrap
	$(INVOKE) unit

bootstrap:
	@scripts/bootstrap
