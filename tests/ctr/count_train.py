"""``python -m ctr.train`` that also counts the cross-host collectives the preemption check runs.

Every ``multihost_utils.process_allgather`` called from ``ctr.preemption.any_process`` is counted; at exit the count
is written to ``$CTR_COLLECTIVES<process index>`` (one integer).
"""
import atexit
import os
import sys

from jax.experimental import multihost_utils

from ctr import train

_allgather = multihost_utils.process_allgather
_count = {"calls": 0, "process": None}


def _counting(*args, **kwargs):
    import jax

    if sys._getframe(1).f_code.co_name == "any_process":
        _count["calls"] += 1
        _count["process"] = jax.process_index()
    return _allgather(*args, **kwargs)


def _write():
    if _count["process"] is not None:
        with open(f"{os.environ['CTR_COLLECTIVES']}{_count['process']}", "w") as f:
            f.write(str(_count["calls"]))


if __name__ == "__main__":
    multihost_utils.process_allgather = _counting
    atexit.register(_write)
    train.run()
