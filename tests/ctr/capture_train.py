"""``python -m ctr.train`` plus a record of every evaluation's per-example outputs, for tests that compare runs.

Process 0 writes ``$CTR_CAPTURE<i>.npz`` (labels, logits, groups) for the i-th call of ``metrics.evaluate``: the
arrays the metrics are computed from, after the multi-host gather.
"""
import os

import numpy as np

from ctr import metrics, train

_evaluate = metrics.evaluate
_calls = []


def _capture(labels, logits, groups=None):
    import jax

    if jax.process_index() == 0:
        extra = {} if groups is None else {"groups": np.asarray(groups)}
        np.savez(f"{os.environ['CTR_CAPTURE']}{len(_calls)}.npz", labels=np.asarray(labels),
                 logits=np.asarray(logits), **extra)  # fmt: skip
    _calls.append(None)
    return _evaluate(labels, logits, groups)


if __name__ == "__main__":
    metrics.evaluate = _capture
    train.run()
