"""pskv's Python API on one process: MXNet's kvstore calls and what they
give, requests, arrays in place (numpy and DLPack), the updater, and every
misuse as an exception naming what is wrong."""

import threading

import numpy as np
import pytest

import pskv


@pytest.fixture
def kv():
    kv = pskv.create("local")
    yield kv
    kv.close()


def f32(*shape, value=0.0):
    return np.full(shape, value, np.float32)


def test_init_push_pull_pushpull_as_mxnet(kv):
    assert (kv.type, kv.rank, kv.num_workers) == ("local", 0, 1)
    kv.init(3, f32(2, 3, value=1))
    kv.init(["a", "b"], [f32(4, value=2), np.arange(4, dtype=np.float64)])
    assert kv.key_info("b") == ([4], "float64", "default")
    # Without an optimizer a push replaces the value; a list of values
    # (one per device) is summed.
    kv.push(3, [f32(2, 3, value=1), f32(2, 3, value=2)]).wait()
    out = f32(2, 3)
    kv.pull(3, out=out).wait()
    assert (out == 3).all()
    # Lists of keys, outputs per key, priorities.
    oa, ob = f32(4), np.zeros(4)
    r = kv.pull(["a", "b"], out=[oa, ob], priority=-1)
    assert isinstance(r, pskv.Request)
    r.wait()
    assert (oa == 2).all() and (ob == np.arange(4)).all()
    # pushpull without out= writes into the value.
    kv.set_optimizer("sgd", learning_rate=0.5)
    g = f32(4, value=2)
    kv.pushpull("a", g).wait()
    assert (g == 1).all()
    o2 = f32(4)
    kv.pushpull("a", f32(4, value=2), out=o2).wait()
    assert (o2 == 0).all()


def test_requests_wait_done_and_waitall(kv):
    kv.init(1, f32(1000))
    reqs = [kv.push(1, f32(1000, value=i)) for i in range(20)]
    out = f32(1000)
    last = kv.pull(1, out=out)
    pskv.waitall()
    assert last.done() and all(r.done() for r in reqs)
    assert (out == 19).all()
    # Waiting again is harmless and says the same.
    last.wait()
    last.wait(timeout=1.0)
    assert "done" in repr(last)
    with pytest.raises(ValueError, match="timeout"):
        last.wait(timeout=-1)


def test_dropped_requests_keep_their_arrays_alive(kv):
    kv.init(5, f32(100_000))
    for i in range(300):  # past the sweep of pending requests
        kv.push(5, f32(100_000, value=i))  # the Request is dropped at once
    out = f32(100_000)
    kv.pull(5, out=out).wait()
    assert (out == 299).all()


def test_dlpack_arrays_in_place(kv):
    class OnlyDlpack:
        """An array known by DLPack alone (as torch's or cupy's are)."""

        def __init__(self, a):
            self.a = a

        def __dlpack__(self, *args, **kwargs):
            return self.a.__dlpack__(*args, **kwargs)

    kv.init(7, OnlyDlpack(np.arange(6, dtype=np.float32)))
    out = np.zeros(6, np.float32)
    kv.pull(7, out=OnlyDlpack(out)).wait()
    assert (out == np.arange(6)).all()


def test_an_updater_runs_while_the_caller_waits_without_the_gil(kv):
    seen = []

    def updater(key, grad, weight):
        seen.append((key, threading.current_thread() is threading.main_thread()))
        if isinstance(grad, pskv.RowSparse):
            weight[grad.indices] += 10 * grad.data
        else:
            weight += 10 * grad

    kv.set_updater(updater)
    kv.init(1, f32(3, value=1))
    # The updater needs the GIL on a pskv thread while this thread waits:
    # a wait that held the GIL would hang here.
    kv.push(1, f32(3, value=1)).wait(timeout=30)
    out = f32(3)
    kv.pull(1, out=out).wait()
    assert (out == 11).all()
    assert seen and seen[0][0] == 1
    # Row-sparse: the updater gets the rows.
    kv.init("e", pskv.row_sparse(np.zeros((4, 2), np.float32)))
    g = np.zeros((4, 2), np.float32)
    g[2] = 1
    kv.push("e", pskv.row_sparse(g)).wait()
    o = np.full((4, 2), -1, np.float32)
    kv.row_sparse_pull("e", out=o, row_ids=[2, 0, 2]).wait()
    assert o.tolist() == [[0, 0], [0, 0], [10, 10], [0, 0]]


def test_an_updater_that_raises_fails_its_request(kv):
    def updater(key, grad, weight):
        raise RuntimeError("no thanks")

    kv.set_updater(updater)
    kv.init(1, f32(2))
    r = kv.push(1, f32(2, value=1))
    with pytest.raises(pskv.PskvError, match="no thanks"):
        r.wait()
    # Said once per wait; the key works again (a pull after it).
    out = f32(2, value=5)
    kv.pull(1, out=out).wait()
    assert (out == 0).all()


def test_compression_on_a_device_store():
    kv = pskv.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(1, f32(4))
    out = f32(4)
    kv.pushpull(1, np.array([0.3, 0.6, -0.7, 0.1], np.float32), out=out).wait()
    assert out.tolist() == [0.0, 0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="3bit"):
        kv.set_gradient_compression({"type": "3bit"})
    kv.close()


def test_optimizer_states_save_and_load(kv, tmp_path):
    kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    kv.init(1, f32(3, value=1))
    kv.push(1, f32(3, value=1)).wait()
    path = str(tmp_path / "states")
    kv.save_optimizer_states(path)
    kv.load_optimizer_states(path)
    with pytest.raises(pskv.PskvError):
        kv.load_optimizer_states(str(tmp_path / "missing"))
    assert kv.num_dead_nodes(1) == 0
    kv.barrier()


def test_misuse_is_an_exception_naming_it(kv):
    kv.init(1, f32(4))
    with pytest.raises(KeyError, match="key 9 was never initialized"):
        kv.pull(9, out=f32(4))
    with pytest.raises(ValueError, match=r"\[3\].*\[4\]"):
        kv.push(1, f32(3))
    with pytest.raises(ValueError, match="f64.*f32"):
        kv.push(1, np.zeros(4))
    ro = f32(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kv.pull(1, out=ro)
    with pytest.raises(ValueError, match="contiguous"):
        kv.pull(1, out=f32(8)[::2])
    with pytest.raises(TypeError, match="not an array"):
        kv.push(1, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="dtype"):
        kv.push(1, np.zeros(4, np.uint8))
    with pytest.raises(pskv.Unsupported, match="bfloat16"):
        kv.push(1, np.zeros(4, np.dtype("V2")))
    with pytest.raises(ValueError, match="empty"):
        kv.push(1, f32(0))
    with pytest.raises(ValueError, match="out="):
        kv.pull(1)
    with pytest.raises(ValueError, match="given twice"):
        kv.pushpull([1, 1], [f32(4), f32(4)])
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        kv.push([1, 2], [f32(4)])
    with pytest.raises(TypeError, match="a key is an int or a str"):
        kv.push(1.5, f32(4))
    with pytest.raises(ValueError, match="key -1 is out of range"):
        kv.push(-1, f32(4))
    with pytest.raises(ValueError, match="already initialized"):
        kv.init(1, f32(4))
    with pytest.raises(ValueError, match="out of range"):
        kv.set_optimizer("sgd", learning_rate=-1)
    with pytest.raises(ValueError, match="not a number"):
        kv.set_optimizer("sgd", learning_rate="fast")
    with pytest.raises(ValueError, match="unknown kvstore type"):
        pskv.create("nope")


def test_a_batch_that_fails_part_way_keeps_its_arrays_until_done(kv):
    kv.init(3, f32(1000))
    out3 = f32(1000, value=7)
    with pytest.raises(KeyError, match="key 99"):
        kv.pull([3, 99], out=[out3, f32(1000)])
    del out3  # the store still holds it while key 3's pull is in flight
    pskv.waitall()
    with pytest.raises(ValueError, match=r"\[3\]"):
        kv.push([3, 3], [f32(1000), f32(3)])
    pskv.waitall()


def test_in_place_pushpull_refuses_a_read_only_value(kv):
    kv.init(1, f32(4))
    ro = f32(4, value=1)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kv.pushpull(1, ro)
    kv.pushpull(1, ro, out=f32(4)).wait()  # with out=, a read-only value is fine


def test_an_updater_that_keeps_its_arrays_is_refused(kv):
    kept = []

    def updater(key, grad, weight):
        kept.append(weight[:2])

    kv.set_updater(updater)
    kv.init(1, f32(4))
    with pytest.raises(pskv.PskvError, match="kept a reference to its weight"):
        kv.push(1, f32(4, value=1)).wait()


def test_done_polls_without_waiting(kv):
    kv.init(1, f32(1 << 20))
    r = kv.push(1, f32(1 << 20, value=1))
    while not r.done():
        pass
    r.wait()


def test_numpy_arrays_of_every_dtype_and_shape_in_place(kv):
    # numpy arrays are read through __array_struct__ (no dict per call);
    # what that path does not decide falls back to __array_interface__.
    for i, dt in enumerate([np.float32, np.float64, np.float16, np.int32, np.int64]):
        kv.init(100 + i, np.zeros((2, 3), dt))
        out = np.zeros((2, 3), dt)
        kv.pushpull(100 + i, np.arange(6, dtype=dt).reshape(2, 3), out=out).wait()
        assert (out == np.arange(6).reshape(2, 3)).all(), dt
    # A 0-d array is one element; a Fortran-order one is not C order.
    kv.init(200, np.zeros(1, np.float32))
    scalar = np.array(7.0, np.float32)
    kv.push(200, scalar).wait()
    one = f32(1)
    kv.pull(200, out=one).wait()
    assert one[0] == 7.0
    with pytest.raises(ValueError, match="contiguous"):
        kv.pull(100, out=np.zeros((3, 2), np.float32).T)
    with pytest.raises(ValueError, match="byte order"):
        kv.push(100, np.zeros((2, 3), np.dtype(">f4" if np.little_endian else "<f4")))
    with pytest.raises(TypeError, match="dtype"):
        kv.push(100, np.zeros((2, 3), np.uint32))


def test_a_row_sparse_value_is_told_from_an_array(kv):
    kv.init(5, pskv.row_sparse(np.zeros((4, 2), np.float32)))
    kv.push(5, pskv.RowSparse(np.ones((1, 2), np.float32), [2], (4, 2))).wait()
    out = np.zeros((4, 2), np.float32)
    kv.row_sparse_pull(5, out=out, row_ids=[0, 2]).wait()
    assert (out[2] == 1).all() and (out[0] == 0).all()
    with pytest.raises(TypeError, match="cannot be an output"):
        kv.pull(5, out=pskv.row_sparse(np.zeros((4, 2), np.float32)))
