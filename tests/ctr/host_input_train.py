"""``python -m ctr.train`` plus a record of what this process read: every ``.npy`` file it opened (through
Python's audit hook, below any ctr code) and every training row it was handed. Written at exit to
``$CTR_HOST_INPUT<process index>.json`` / ``.npz``."""
import atexit
import json
import os
import sys

import numpy as np

from ctr import train
from ctr.data import prepared

_opened = []
_rows = []


def _audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and os.fspath(args[0]).endswith(".npy"):
        _opened.append(os.fsdecode(args[0]))


def _recording(train_batches):
    def wrapped(self, *args, **kwargs):
        for batch in train_batches(self, *args, **kwargs):
            _rows.append(np.concatenate([batch["label"][:, None].astype(np.float64), batch["dense"]], axis=1))
            yield batch

    return wrapped


def _write():
    import jax

    out = f"{os.environ['CTR_HOST_INPUT']}{jax.process_index()}"
    with open(out + ".json", "w") as f:
        json.dump(_opened, f)
    np.savez(out + ".npz", rows=np.concatenate(_rows) if _rows else np.zeros((0, 0)))


if __name__ == "__main__":
    sys.addaudithook(_audit)
    prepared.PreparedDataset.train_batches = _recording(prepared.PreparedDataset.train_batches)
    atexit.register(_write)
    train.run()
