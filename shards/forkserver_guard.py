"""Imported only by the decode forkserver (first in its preload list): it ends with the trainer.

The trainer puts its pid in the environment before the forkserver starts (shards/lifeline.py).
"""

from __future__ import annotations

import os

from shards.lifeline import OWNER_ENV, end_with_parent

_owner = os.environ.get(OWNER_ENV)
if _owner is not None and _owner.isdigit():
    end_with_parent(int(_owner), thread=False)  # the forkserver forks: a signal, no thread on Linux
