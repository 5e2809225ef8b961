"""Every command's bad-input policy (docs/ERRORS.md), table-driven and in-process: a user's mistake exits 2 with
one line naming the flag, binding, file or split, and leaves no output behind."""
import os
import signal

import gin
import pytest

from ctr import errors, prepare, train as train_cli
from ctr.data import shard_writer, synthetic

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


pytestmark = pytest.mark.usefixtures("clean_gin")


def _one_error_line(capsys, command):
    """The command's single error line (stderr may also hold other libraries' warnings, never a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{command}: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and len(lines[0]) <= errors.MAX_LINE + 40, err
    return lines[0]


# -- train ------------------------------------------------------------------------------------------------------

TRAIN_CASES = [
    # (bindings, extra gin file content or None, expected text in the line)
    (["no_such_thing.value = 1"], None, "configuration error: No configurable matching 'no_such_thing'"),
    (["train.no_such_parameter = 3"], None, "no_such_parameter"),
    (["DCNv2.num_cross_layerz = 2"], None, "num_cross_layerz"),
    (["train.batch_size = "], None, "Unable to parse value"),
    ([], "include 'configs/nope.gin'\n", "nope.gin"),
    (['train.batch_size = "big"'], None, "train.batch_size: expected an integer, got 'big' (str)"),
    (["train.num_steps = -5"], None, "train.num_steps: must be >= 1, got -5"),
    (["train.num_steps = 0"], None, "train.num_steps: must be >= 1, got 0"),
    (["train.num_steps = 2.5"], None, "train.num_steps: expected an integer, got 2.5 (float)"),
    (["train.num_epochs = 2"], None, "train.num_steps = 40 and train.num_epochs = 2: give one"),
    (["train.num_steps = None", "train.num_epochs = 0"], None, "train.num_epochs: expected a number > 0, got 0"),
    (["train.log_every = 0"], None, "train.log_every: must be >= 1"),
    (["train.eval_every = -1"], None, "train.eval_every: must be >= 0"),
    (['train.model_name = "dcnv3"'], None, "train.model_name: unknown model 'dcnv3'; registered: cetnet, dcnv2"),
    (['train.final_eval_splits = ("tset",)'], None, "train.final_eval_splits"),
    (["train.batch_size = 250"], None, "train.batch_size = 250 does not divide over the 8 devices"),
    (["train.eval_batch_size = 1001"], None, "train.eval_batch_size = 1001 does not divide over the 8 devices"),
    (["make_mesh.model = 3"], None, "make_mesh.model = 3 does not divide the 8 devices"),
    (["train.dataset_fn = @prepared", 'prepared.data_dir = "{tmp}/not_prepared"'], None,
     "{tmp}/not_prepared: not a prepared dataset (no such directory; check prepared.data_dir / DATA_DIR"),
    (["train.dataset_fn = @prepared"], None,
     "configuration error: Required bindings for `prepared` not provided in config: ['data_dir']"),
    (["train.batch_size = 8192"], None, "train.batch_size = 8192 is larger than the train split of criteo (4800 rows)"),
    (['logical_rules.table_rows = ("data", "model")', "build_collection.row_alignment = 3"], None,
     "rows, which do not divide over the 8 devices of logical_rules.table_rows = ('data', 'model'): raise "
     "build_collection.row_alignment"),
    (['logical_rules.table_rows = ("modle",)'], None,
     "logical_rules.table_rows = ('modle',): expected distinct axes of the mesh ('data', 'model')"),
    # CETNet's tower names key the per-tower collections: a mismatch fails before anything is traced.
    (['train.model_name = "cetnet"', "train.embedding_fn = @tower_collections",
      'tower_collections.towers = {{"interformer": @interformer/per_feature_tables, "dhn": @dhen/per_feature_tables}}'],
     None, "tower_collections.towers has collections for ['dhn', 'interformer'] but CETNet.towers names "
           "['dhen', 'interformer']"),
    (["train.embedding_fn = @tower_collections", 'tower_collections.towers = {{"a": @per_feature_tables}}'], None,
     "per-tower collections (['a']), which only an ensemble reads; train.model_name = 'dcnv2' is not one"),
    (['train.model_name = "cetnet"', 'CETNet.towers = (("a/b", "dhen"),)'], None,
     "CETNet.towers: tower name 'a/b' must be a non-empty string without '/'"),
]  # fmt: skip


@pytest.mark.parametrize("bindings, gin_text, expected", TRAIN_CASES, ids=lambda c: None)
def test_train_user_errors(tmp_path, capsys, bindings, gin_text, expected):
    files = [TINY]
    if gin_text is not None:
        (tmp_path / "extra.gin").write_text(gin_text)
        files.append(str(tmp_path / "extra.gin"))
    run_dir = tmp_path / "run"
    bindings = [b.format(tmp=tmp_path) for b in bindings]
    code = train_cli.run_command(
        files, [f'train.run_dir = "{run_dir}"', f'synthetic_criteo.data_dir = "{tmp_path}/data"', *bindings]
    )
    assert code == errors.EXIT_USER
    line = _one_error_line(capsys, "ctr.train")
    assert expected.format(tmp=tmp_path) in line, line
    assert not run_dir.exists()  # nothing written: the checks run before the run directory is made


def test_train_missing_gin_file_is_named(tmp_path, capsys):
    assert train_cli.run_command([str(tmp_path / "nope.gin")], []) == errors.EXIT_USER
    assert f"--gin_file={tmp_path}/nope.gin: no such file" in _one_error_line(capsys, "ctr.train")


@gin.configurable
def _terminated_dataset():
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run starts up (the loop has its own handler)
    raise AssertionError("SIGTERM did not stop the start-up")


def test_sigterm_during_start_up_says_so(tmp_path, capsys):
    bindings = [f'train.run_dir = "{tmp_path}/run"', "train.dataset_fn = @_terminated_dataset"]
    code = train_cli.run_command([TINY], bindings)
    assert code == errors.EXIT_OK
    assert "stopped by SIGTERM outside the training loop" in _one_error_line(capsys, "ctr.train")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


# -- prepare ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    """Small raw directories, one per layout a case needs."""
    root = tmp_path_factory.mktemp("raws")

    def days(name, numbers, rows=60):
        os.makedirs(root / name)
        for d in numbers:
            synthetic.criteo.write_synthetic(str(root / name / f"day_{d}"), rows, seed=d)

    days("days", [0, 1, 2])
    days("one_day", [0])
    days("gap", [0, 2], rows=10)
    os.makedirs(root / "kaggle")
    synthetic.criteo.write_synthetic(str(root / "kaggle" / "train.txt"), 300, seed=1)
    os.makedirs(root / "two_encodings")
    synthetic.criteo.write_synthetic(str(root / "two_encodings" / "train.txt"), 300, seed=1)
    synthetic.criteo.write_synthetic(str(root / "two_encodings" / "train.txt.gz"), 300, seed=1)
    days("kaggle_and_days", [0], rows=10)
    synthetic.criteo.write_synthetic(str(root / "kaggle_and_days" / "train.txt"), 10, seed=1)
    lines = (root / "kaggle" / "train.txt").read_text().splitlines()
    os.makedirs(root / "bad_label")
    (root / "bad_label" / "train.txt").write_text("\n".join(lines[:10] + ["7" + lines[10][1:]] + lines[11:]) + "\n")
    os.makedirs(root / "nul_field")
    fields = lines[3].split("\t")
    fields[1] = "\0" * 16000  # I1: a block of NULs
    (root / "nul_field" / "train.txt").write_text("\n".join(lines[:3] + ["\t".join(fields)] + lines[4:]) + "\n")
    os.makedirs(root / "torn_gzip")
    synthetic.criteo.write_synthetic(str(root / "torn_gzip" / "train.txt.gz"), 3000, seed=1)
    os.truncate(root / "torn_gzip" / "train.txt.gz", os.path.getsize(root / "torn_gzip" / "train.txt.gz") // 2)
    os.makedirs(root / "empty_file")
    (root / "empty_file" / "train.txt").write_bytes(b"")
    (root / "a_file").write_text("not a directory\n")
    return root


PREPARE_CASES = [
    # (raw dir under the fixture, flags, expected text in the line)
    ("days", ["--split_fractions=a,b,c"], "--split_fractions=a,b,c: 'a' is not a number"),
    ("days", ["--split_fractions=0.5,0.5"], "--split_fractions=0.5,0.5: expected 3 fractions"),
    ("days", ["--split_fractions=0.5,0.3,0.3"], "--split_fractions: split fractions (0.5, 0.3, 0.3) must be >= 0 and"),
    ("days", ["--split_fractions=1,0,0"], "--split_fractions=1,0,0: the valid split would be empty"),
    ("days", ["--shard_mib=0"], "--shard_mib=0: must be >= 1"),
    ("days", ["--threads=0"], "--threads=0: must be >= 1"),
    ("days", ["--max_bad_rows=-1"], "--max_bad_rows=-1: must be >= 0"),
    ("days", ["--split=time", "--valid=nope"], "--valid: valid must be 'half', 'test' or a day, got 'nope'"),
    ("days", ["--split=time", "--test_day=1", "--valid=1"], "--valid=1: the valid day is not before the test day 1"),
    ("days", ["--split=time", "--valid=5"], "--valid=5: the valid day is not before the test day 2"),
    ("days", ["--gin_param=criteo.Processing.foo = 1"],
     "configuration error: Configurable 'criteo.Processing' doesn't have a parameter named 'foo'"),
    ("days", ['--gin_param=criteo.Processing.min_count = "x"'], "criteo.Processing.min_count: expected int, got 'x'"),
    ("days", ["--gin_param=criteo.Processing.min_count = -2"], "criteo.Processing.min_count: must be >= 0, got -2"),
    ("days", ["--gin_file=nope.gin"], "--gin_file=nope.gin: no such file"),
    ("days", ["--dataset=criteo2"], "usage error: flag --dataset=criteo2: value should be one of"),
    ("days", ["--raw_files=day_9"], "--raw_files=day_9 matches no file"),
    ("one_day", ["--split=time"], "split 'train' of {raw}/one_day would be empty (--split=time with test day 0"),
    ("days", ["--split=time", "--test_day=7"],
     "split 'test' of {raw}/days would be empty (--split=time with test day 7; the rows' days run from 0 to 2)"),
    ("days", ["--split=time", "--test_day=0"], "split 'train' of {raw}/days would be empty"),
    ("gap", [], "{raw}/gap: day_1 is missing between day_0 and day_2"),
    ("two_encodings", [], "both train.txt and train.txt.gz, which hold the same data; choose one with --raw_files="),
    ("kaggle_and_days", [], "both the Kaggle file train.txt and daily logs day_*; choose with --raw_files="),
    ("nowhere", [], "{raw}/nowhere: no Criteo files"),
    ("bad_label", [], "{raw}/bad_label/train.txt:11: field label: label must be 0 or 1, got b'7'"),
    ("nul_field", [], "{raw}/nul_field/train.txt:4: field I1: not an integer b'\\x00\\x00"),
    ("torn_gzip", [], "corrupt or truncated gzip stream"),
    ("empty_file", [], "{raw}/empty_file/train.txt: empty file"),
]  # fmt: skip


def _prepare(raws, raw, out, *extra):
    return prepare.cli(["ctr.prepare", "--dataset=criteo", f"--raw_dir={raws / raw}", f"--out_dir={out}",
                        "--shard_mib=1", *extra])  # fmt: skip


@pytest.mark.parametrize("raw, extra, expected", PREPARE_CASES, ids=lambda c: None)
def test_prepare_user_errors(raws, tmp_path, capsys, raw, extra, expected):
    out = tmp_path / "out"
    assert _prepare(raws, raw, out, *extra) == errors.EXIT_USER
    line = _one_error_line(capsys, "ctr.prepare")
    assert expected.format(raw=raws) in line, line
    assert not out.exists()  # a directory prepare made is removed again


def test_prepare_a_quoted_field_is_shortened(raws, tmp_path, capsys):
    assert _prepare(raws, "nul_field", tmp_path / "out") == errors.EXIT_USER
    line = _one_error_line(capsys, "ctr.prepare")
    assert "... (16,000 bytes)" in line and len(line) < 300


def test_prepare_output_that_cannot_be_written(raws, tmp_path, capsys):
    out = raws / "a_file" / "out"
    assert _prepare(raws, "days", out) == errors.EXIT_USER
    assert f"{out}: Not a directory" in _one_error_line(capsys, "ctr.prepare")
    full = tmp_path / "full"
    full.write_text("x")
    assert _prepare(raws, "days", full) == errors.EXIT_USER
    assert f"--out_dir={full}: exists and is not a directory" in _one_error_line(capsys, "ctr.prepare")


def test_prepare_full_disk_names_the_directory_and_leaves_nothing(raws, tmp_path, capsys, monkeypatch):
    """numpy's only words for a full disk are "N requested and 0 written"; the line names the disk and where."""

    class FullBucket(shard_writer.Bucket):
        def __init__(self, path):
            super().__init__(path)
            self.file.close()
            self.file = open("/dev/full", "wb")

    monkeypatch.setattr(shard_writer, "Bucket", FullBucket)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory stays, empty
    assert _prepare(raws, "days", out) == errors.EXIT_USER
    line = _one_error_line(capsys, "ctr.prepare")
    assert f"{out}: no space left on the device (" in line and "requested and" in line and "MiB free" in line
    assert os.listdir(out) == []


def test_prepare_out_dir_not_empty_is_kept_as_it_was(raws, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert _prepare(raws, "days", out) == errors.EXIT_USER
    assert "output directory is not empty" in _one_error_line(capsys, "ctr.prepare")
    assert os.listdir(out) == ["mine.txt"]


def test_prepare_missing_required_flag(capsys):
    assert prepare.cli(["ctr.prepare", "--dataset=criteo", "--raw_dir=x"]) == errors.EXIT_USER
    assert "usage error: flag --out_dir=None" in _one_error_line(capsys, "ctr.prepare")


def test_prepare_raw_files_picks_one_encoding(raws, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prepare(raws, "two_encodings", out, "--raw_files=train.txt.gz") == errors.EXIT_OK
    metadata = prepare.prepared.read_metadata(str(out))
    assert metadata["accounting"]["rows_read"] == {"criteo": 300}  # one of the two copies, not both
    assert all(metadata["splits"][s]["rows"] > 0 for s in ("train", "valid", "test"))


# -- unexpected errors ------------------------------------------------------------------------------------------


def test_prepare_unexpected_error_keeps_its_traceback_and_leaves_nothing(raws, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(shard_writer, "apply_vocab", broken)
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError, match="a bug"):  # not turned into a one-line exit 2
        _prepare(raws, "days", out, "--gin_param=criteo.Processing.min_count = 2")
    assert not out.exists()


@gin.configurable
def _broken_dataset():
    raise ZeroDivisionError("a bug")


def test_train_unexpected_error_keeps_its_traceback(tmp_path):
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train_cli.run_command([TINY], [f'train.run_dir = "{tmp_path}/run"', "train.dataset_fn = @_broken_dataset"])
    assert not (tmp_path / "run").exists()
