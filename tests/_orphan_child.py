"""A loader-only process for the orphan test: reads shards with DataLoader workers, slowly.

    python -m tests._orphan_child SHARD_DIR WORKERS

Prints "ready" once the first batch arrived, then keeps reading (one batch a second) until killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from shards.loader import build_train_loader
from shards.manifest import load_manifest


def main() -> None:
    manifest = load_manifest(Path(sys.argv[1]))
    loader = build_train_loader(manifest, batch_size=4, backend="torch", workers=int(sys.argv[2]))
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for _ in loader:
            print("ready", flush=True)
            time.sleep(1.0)
        epoch += 1


if __name__ == "__main__":
    main()
