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
