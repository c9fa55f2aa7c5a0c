"""What every stage shares, below all of them: one-line user errors and the way a command ends
(`common.cli`), crash-safe file writes (`common.fileio`). Imports nothing of the project."""
