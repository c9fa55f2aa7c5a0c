"""What every stage shares, below all of them: one-line user errors and the way a command ends
(`common.cli`), crash-safe file writes (`common.fileio`), the one lock on an output folder
(`common.folder_lock`), YAML read with bounds (`common.bounded_yaml`), config keys declared once
(`common.settings`). Imports nothing of the project."""
