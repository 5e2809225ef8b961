"""TensorFlow's CUDA-probe lines are dropped on a machine without a GPU; every other stderr line is kept."""
import os
import subprocess
import sys

from ctr import tf_import

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What TF 2.21 printed on this project's CPU machine, importing it and creating a TensorBoard writer.
PROBE = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796130954.661180   13407 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796130954.662330   13407 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1796130956.126766   13407 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_probe_lines_are_dropped_and_other_lines_kept():
    real = "E0000 00:00:1796130956.2 13407 op_kernel.cc:1830] OP_REQUIRES failed: not found: /data/x\nTraceback\n"
    assert tf_import.drop_probe_noise(PROBE) == ""
    assert tf_import.drop_probe_noise(PROBE + real + PROBE) == real


def test_importing_tensorflow_prints_no_cuda_probe_and_hides_gpus(tmp_path):
    code = (
        "import sys; from ctr import tf_import; tf = tf_import.tensorflow(); "
        "tf.summary.create_file_writer(sys.argv[1]); "
        "print(len(tf.config.get_visible_devices('GPU'))); print('still here', file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
    assert "still here" in out.stderr  # stderr written after the import reaches the terminal
    for noise in ("cuInit", "cudart_stub", "absl::InitializeLog", "oneDNN"):
        assert noise not in out.stderr, out.stderr
