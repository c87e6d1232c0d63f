"""pskv: a parameter-server kvstore for distributed training.

MXNet's kvstore API (``mxnet.kvstore``) over numpy arrays and DLPack arrays
(torch, cupy, jax, ...), used in place, without copies::

    import numpy as np, pskv
    kv = pskv.create("dist_sync")          # joins the job `pskv launch` started
    w = np.ones(4, np.float32)
    kv.init(3, w)
    kv.set_optimizer("sgd", learning_rate=0.1)
    g = np.full(4, 0.5, np.float32)
    kv.push(3, g, priority=-3)             # returns a Request at once
    kv.pull(3, out=w).wait()               # w holds the new weights
    kv.close()

push, pull, pushpull and row_sparse_pull return a ``Request``: the arrays
belong to pskv until its ``wait()`` returns (or ``done()`` says True);
``pskv.waitall()`` (MXNet's ``mx.nd.waitall()``) waits for every request
of every store. Waits release the GIL. Errors are exceptions naming the
key and the sizes: ``KeyError`` (a key never initialized), ``ValueError``
(a wrong size, type or argument), ``TimeoutError``, ``pskv.PskvError``
(what the kvstore failed: a node that died, ...), ``pskv.Unsupported``.
"""

import atexit
import weakref

import numpy as _np

from ._pskv import KVStore, PskvError, Request, Unsupported, __version__
from ._pskv import create as _create

__all__ = [
    "create",
    "waitall",
    "KVStore",
    "Request",
    "RowSparse",
    "row_sparse",
    "PskvError",
    "Unsupported",
    "__version__",
]

_stores = weakref.WeakSet()


def create(name="local"):
    """Creates a kvstore: ``local``, ``device``, ``dist_sync``,
    ``dist_async`` or ``dist_sync_device``. A distributed kind joins the
    job of the ``DMLC_*`` variables that ``pskv launch`` sets."""
    kv = _create(name)
    _stores.add(kv)
    return kv


@atexit.register
def _close_all():
    """At exit, every store still open is closed (its requests waited for,
    rank 0 stopping the servers), while the interpreter can still run a
    Python updater."""
    for kv in list(_stores):
        try:
            kv.close()
        except Exception as e:  # exiting: say it, go on with the others
            import sys

            print(f"pskv: closing {kv!r} at exit: {e}", file=sys.stderr)


def waitall():
    """Waits for every request of every store (MXNet's
    ``mx.nd.waitall()``); raises the first error not raised before."""
    first = None
    for kv in list(_stores):
        try:
            kv.wait_all()
        except Exception as e:  # every store is waited for
            if first is None:
                first = e
    if first is not None:
        raise first


class RowSparse:
    """A row-sparse value (MXNet's ``RowSparseNDArray``): the rows
    ``indices`` (ascending, unique) of an array of ``shape`` hold ``data``
    (``len(indices)`` rows); every other row is zero. Push it, or init a
    key with it to make a row-sparse key."""

    _pskv_row_sparse = True

    def __init__(self, data, indices, shape):
        self.data = _np.ascontiguousarray(data)
        self.indices = [int(i) for i in _np.asarray(indices).ravel()]
        self.shape = tuple(int(d) for d in shape)
        if self.data.shape[:1] != (len(self.indices),):
            raise ValueError(
                f"RowSparse: {len(self.indices)} indices but {self.data.shape[0] if self.data.ndim else 0} rows of data"
            )

    @property
    def dtype(self):
        return self.data.dtype

    def todense(self):
        """The dense array."""
        out = _np.zeros(self.shape, self.data.dtype)
        if self.indices:
            out[self.indices] = self.data
        return out

    def __repr__(self):
        return f"<pskv.RowSparse {self.shape} {self.data.dtype}, {len(self.indices)} rows>"


def row_sparse(dense):
    """A dense array's non-zero rows as a ``RowSparse`` (MXNet's
    ``a.tostype('row_sparse')``)."""
    a = _np.asarray(dense)
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    rows = _np.flatnonzero(flat.any(axis=1))
    return RowSparse(a[rows], rows, a.shape)
