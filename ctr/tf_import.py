"""TensorFlow, imported once, without its CUDA-probe noise and without the GPUs (TF serves only the host side).

TensorFlow is used on the host only (TensorBoard events, the fingerprint's TF reference, the synthetic
generators, serving-side ops); the accelerators belong to JAX. Importing TF on a machine without a GPU prints
its CUDA probe to stderr from C++ before any Python log level applies (``cudart_stub ... Could not find cuda
drivers``, ``failed call to cuInit``, absl's pre-init banner, oneDNN's notice), lines a user reads as failures.
:func:`tensorflow` imports TF and hides its GPUs (so it neither probes them again nor reserves their memory)
with file descriptor 2 redirected to a temporary file, then writes back every captured line except those
known probe lines: a real error printed meanwhile still reaches stderr.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import types

# Lines TF prints while probing for CUDA on import and at its first device query (TF 2.21).
PROBE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cuda_executor\.cc:\d+\] .*(kernel driver|NUMA node)"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning: Could not find TensorRT"
)

_lock = threading.Lock()
_quieted = False


def tensorflow() -> types.ModuleType:
    """The ``tensorflow`` module; the first call imports it quietly (see the module docstring).

    Raises:
      ImportError: TF is not installed (callers that can do without it catch this).
    """
    global _quieted
    with _lock:
        if not _quieted:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's own Python/C++ INFO and WARNING lines
            _import_quietly()
            _quieted = True
    import tensorflow as tf  # imported by now: a dictionary look-up

    return tf


def _import_quietly() -> types.ModuleType:
    """Imports TF and hides its GPUs with fd 2 captured; writes the captured lines back but the probe's."""
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")  # the first device query: TF's cuInit line comes here
            except RuntimeError:  # TF was imported and its devices initialised before (by other code): keep them
                pass
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = drop_probe_noise(captured.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
    return tf


def drop_probe_noise(text: str) -> str:
    """``text`` without the lines :data:`PROBE_NOISE` matches (every other line is kept, in order)."""
    return "".join(line for line in text.splitlines(keepends=True) if not PROBE_NOISE.search(line))
