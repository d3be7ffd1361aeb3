"""Cache round trip, crash safety, resume, partial reads, integrity errors."""
import os

import h5py
import numpy as np
import pytest

from gradood.store.reader import CacheReader
from gradood.store.schema import SCHEMA_VERSION, CacheError, fingerprint
from gradood.store.writer import CacheWriter, parts_dir


def make_writer(path, n=10, arch="resnet18"):
    attrs = {"schema_version": SCHEMA_VERSION, "n_samples": n, "dataset": "toy", "arch": arch,
             "num_classes": 3, "checkpoint_sha256": "abc", "preprocess": {"name": "x"},
             "objectives": ["max_logit"], "layers": ["l1"], "layer_shapes": {"l1": [2, 4, 4]},
             "hook_sets": {"bn": ["l1"]}, "plan": {"l1": {"max_logit": ["nonzero"]}}}
    attrs["fingerprint"] = fingerprint(attrs)
    layout = {"logits": ((3,), np.float32), "features": ((5,), np.float32), "labels": ((), np.int64),
              "paths": ((), object), "skipped": ((), np.bool_),
              "layers/l1/grad/max_logit/nonzero": ((2,), np.int32)}
    consts = {"head/weight": np.ones((3, 5), np.float32), "head/bias": np.zeros(3, np.float32)}
    return CacheWriter(path, attrs, layout, consts, n)


def rows(start, stop):
    n = stop - start
    r = np.arange(start, stop)
    return {"logits": np.tile(r[:, None], (1, 3)).astype(np.float32),
            "features": np.tile(r[:, None], (1, 5)).astype(np.float32),
            "labels": r.astype(np.int64), "paths": [f"img{i}.png" for i in r],
            "skipped": np.zeros(n, bool),
            "layers/l1/grad/max_logit/nonzero": np.tile(r[:, None], (1, 2)).astype(np.int32)}


def write_all(w, n=10, step=4):
    start = w.start()
    for a in range(start, n, step):
        w.write_rows(a, rows(a, min(a + step, n)))
    return w.assemble()


def test_round_trip(tmp_path):
    path = str(tmp_path / "toy.h5")
    write_all(make_writer(path))
    assert not os.path.exists(parts_dir(path))
    with CacheReader(path) as r:
        assert r.n_samples == 10 and r.attrs["complete"] is True
        np.testing.assert_array_equal(r.read_all("labels"), np.arange(10))
        assert list(r.read_all("paths")) == [f"img{i}.png" for i in range(10)]
        np.testing.assert_array_equal(r.read("layers/l1/grad/max_logit/nonzero", 3, 5), [[3, 3], [4, 4]])
        assert r.head()[0].shape == (3, 5)
    with h5py.File(path) as f:   # self-describing for plain h5py users
        assert f["logits"].fletcher32 and f["logits"].compression is None     # floats: read speed
        assert f["labels"].fletcher32 and f["labels"].compression == "gzip"
        assert f.attrs["schema_version"] == SCHEMA_VERSION


def test_resume_after_interruption_continues_and_matches(tmp_path):
    path = str(tmp_path / "toy.h5")
    w = make_writer(path)
    assert w.start() == 0
    w.write_rows(0, rows(0, 4))
    w.write_rows(4, rows(4, 8))
    w.release()      # the process "dies": the operating system drops its lock
    # a crash mid-write leaves a temporary file; it must be ignored and removed
    open(os.path.join(parts_dir(path), "rows-000000008-000000010.h5.tmp"), "w").write("garbage")
    with pytest.raises(CacheError, match="8 of 10 samples"):
        CacheReader(path)
    with CacheReader(path, allow_partial=True) as r:
        assert r.partial and r.n_samples == 8
        np.testing.assert_array_equal(r.read_all("labels"), np.arange(8))
    w2 = make_writer(path)
    assert w2.start() == 8
    w2.write_rows(8, rows(8, 10))
    w2.assemble()
    ref = str(tmp_path / "ref.h5")
    write_all(make_writer(ref), step=3)
    with CacheReader(path) as a, CacheReader(ref) as b:
        for name in ("logits", "labels", "layers/l1/grad/max_logit/nonzero"):
            np.testing.assert_array_equal(a.read_all(name), b.read_all(name))


def test_resume_with_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "toy.h5")
    w = make_writer(path)
    w.start()
    w.write_rows(0, rows(0, 4))
    w.release()
    with pytest.raises(CacheError, match="fingerprint.arch"):
        make_writer(path, arch="resnet34").start()


def test_truncated_file_gives_one_line_error(tmp_path):
    path = str(tmp_path / "toy.h5")
    write_all(make_writer(path))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CacheError) as err:
        with CacheReader(path) as r:
            r.read_all("logits")
    assert "toy.h5" in str(err.value) and "Traceback" not in str(err.value)


def test_corrupted_chunk_is_detected_by_checksum(tmp_path):
    path = str(tmp_path / "toy.h5")
    write_all(make_writer(path))
    with h5py.File(path) as f:
        offset = f["logits"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheError, match="damaged data in 'logits'"):
        with CacheReader(path) as r:
            r.read_all("logits")


def test_missing_cache_names_the_command(tmp_path):
    with pytest.raises(CacheError, match="pipeline.py extract"):
        CacheReader(str(tmp_path / "nothing.h5"))
