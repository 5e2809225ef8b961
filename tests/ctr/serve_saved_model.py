"""Runs requests against exported SavedModels in a process that cannot import JAX, as TF Serving loads them.

``python serve_saved_model.py REQUESTS OUT``: REQUESTS is a pickled list of ``(saved_model_dir, signature,
{input: numpy array})``; OUT receives, per request, ``{output: numpy array}`` or ``("error", type, message)``.
"""
import os
import pickle
import sys

sys.modules["jax"] = None  # any `import jax` (by TF or by the SavedModel's loading) now raises ImportError
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def main(request_path: str, out_path: str) -> None:
    with open(request_path, "rb") as f:
        requests = pickle.load(f)
    models, results = {}, []
    for path, signature, inputs in requests:
        if path not in models:
            models[path] = tf.saved_model.load(path)
        fn = models[path].signatures[signature]
        try:
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
            results.append({k: v.numpy() for k, v in out.items()})
        except Exception as e:  # noqa: BLE001  (the test asserts on each error)
            results.append(("error", type(e).__name__, str(e)))
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
