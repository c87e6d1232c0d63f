"""pskv from Python under `pskv launch`: the port of MXNet's nightly
distributed kvstore test (dist_sync_kvstore.py) with 2 workers and 2
servers, and a store used after close."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pskv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def pskv_bin():
    """The pskv program: $PSKV_BIN, else the repository's build, else PATH."""
    if os.environ.get("PSKV_BIN"):
        return os.environ["PSKV_BIN"]
    for profile in ["debug", "release"]:
        p = ROOT / "target" / profile / "pskv"
        if p.exists():
            return str(p)
    p = shutil.which("pskv")
    if p is None:
        pytest.fail("no pskv program: build it (cargo build) or set PSKV_BIN")
    return p


def test_mxnet_nightly_dist_sync_checks_pass_under_pskv_launch():
    cmd = [pskv_bin(), "launch", "-n", "2", "-s", "2", "--timeout", "240", "--",
           sys.executable, str(HERE / "dist_sync_kvstore.py"), "--nrepeat", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for rank in range(2):
        for stage in ["is initialized", "is done with non compression tests",
                      "is done with compression tests"]:
            assert f"worker {rank} {stage}" in r.stdout, out


def test_a_closed_store_refuses_calls():
    kv = pskv.create("local")
    kv.init(1, np.zeros(2, np.float32))
    kv.close()
    kv.close()
    with pytest.raises(pskv.PskvError, match="the local store was closed"):
        kv.push(1, np.ones(2, np.float32))
    with pytest.raises(pskv.PskvError, match="closed"):
        kv.barrier()


def test_a_script_that_never_closes_its_store_exits_cleanly(tmp_path):
    script = tmp_path / "no_close.py"
    script.write_text(
        "import numpy as np, pskv\n"
        "kv = pskv.create('local')\n"
        "kv.set_updater(lambda k, g, w: w.__iadd__(g))\n"
        "kv.init(1, np.zeros(4, np.float32))\n"
        "kv.push(1, np.ones(4, np.float32))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "panicked" not in r.stderr and "Error" not in r.stderr, r.stderr


def test_push_buffers_push_in_place_over_shm(tmp_path):
    """Each worker writes its gradient into the key's push buffer (over
    shm: its slots of the key's segment) and push-pulls from it: the sum
    is right, and the parts went in place (nothing copied in)."""
    script = tmp_path / "push_buffers.py"
    script.write_text(
        "import numpy as np, pskv\n"
        "kv = pskv.create('dist_sync')\n"
        "kv.init(3, np.zeros(4096, np.float32))\n"
        "g = kv.push_buffer(3)\n"
        "assert g.shape == (4096,) and g.dtype == np.float32 and not g.any()\n"
        "out = np.zeros(4096, np.float32)\n"
        "for step in range(3):\n"
        "    g[:] = kv.rank + 1 + step\n"
        "    kv.pushpull(3, g, out=out)\n"
        "    kv.wait_all()\n"
        "    assert (out == 3 + 2 * step).all(), (step, out[:4])\n"
        "assert kv.pushed_in_place() == 3, kv.pushed_in_place()\n"
        "try:\n"
        "    kv.push_buffer(3)\n"
        "    raise SystemExit('a second push buffer of the key was made')\n"
        "except ValueError as e:\n"
        "    assert 'already' in str(e), e\n"
        "kv.close()\n"
        "print('worker', kv.rank, 'pushed in place')\n"
    )
    cmd = [pskv_bin(), "launch", "-n", "2", "-s", "1", "--timeout", "120", "--",
           sys.executable, str(script)]
    env = dict(os.environ, PSKV_VAN="shm")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for rank in range(2):
        assert f"worker {rank} pushed in place" in r.stdout, out
