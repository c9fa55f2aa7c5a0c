"""The test suite, one folder per package (tests/heads/ tests heads/, ...); shared helpers in
tests/_*.py. Helper scripts run in a subprocess start as modules from the repository root
(`python -m tests._trainer_faults ...`), never as files: as a file, tests/ would come first on the
import path and tests/heads/ would shadow the heads package."""
