/* pskv: the C ABI of a parameter-server stack for distributed training.
 *
 * Generated from src/capi/ by cbindgen; do not edit (CI checks it is fresh).
 * Link with -lpskv (libpskv.so or libpskv.a; the static library also needs
 * -lpthread -ldl -lm). Installed by scripts/install-c.sh, it is found by
 * pkg-config (pskv) and by CMake: find_package(pskv 0.1), target pskv::pskv
 * or pskv::pskv_static.
 *
 * Status: every function returns PSKV_OK (0) or a negative error code;
 * pskv_last_error() gives the calling thread's last message. Nothing
 * aborts the process: bad pointers, lengths and handles are errors.
 *
 * Versions: PSKV_ABI_VERSION is this header's; pskv_abi_version() the
 * library's. Version 2 added requests, buffers and the calls after them;
 * version 3 persistent requests. A library serves programs built against
 * its version or an older one (calls are only ever added).
 *
 * Threads: every function may be called from any thread, concurrently, on
 * one store or several; a request may be waited for on another thread
 * than the one that issued it. Operations of one store on one key run in
 * the order they were issued. A custom updater runs on pskv's threads.
 *
 * Handles (stores and requests) are checked tokens: a freed, reported or
 * made-up handle is PSKV_ERR_ARGUMENT, never a crash.
 *
 * Requests (pskv_*_async): the buffers are used in place, not copied. From
 * the call until pskv_wait/pskv_test/pskv_wait_all reports the request,
 * do not write its input buffers nor read or write its outputs. Report
 * every request once; the report frees its handle.
 *
 * Persistent requests (pskv_*_persistent): made once over a batch's
 * buffers, started each round by pskv_start and reported by the same
 * waits (each start once); between a report and the next start the
 * buffers are the caller's. Freed by pskv_request_free. The buffers are
 * checked, wrapped and their keys' calls planned when the request is
 * made, not per round: a 4 B start and wait cost about 0.64x the Rust
 * API's plain call on tensors made once, a pskv_*_async call about 1 us
 * more than that call. */

#ifndef PSKV_H
#define PSKV_H



#include <stddef.h>
#include <stdint.h>

// The version of this interface: a program built against this header
// checks it against `pskv_abi_version()` at run time.
#define PSKV_ABI_VERSION 3

// Success.
#define PSKV_OK 0

// A null pointer, a bad string or a bad length was passed.
#define PSKV_ERR_ARGUMENT -1

// The kvstore refused or failed the operation (unknown key, wrong size,
// a node that died, ...): see `pskv_last_error`.
#define PSKV_ERR_KVSTORE -2

// pskv failed internally (a caught panic): see `pskv_last_error`.
#define PSKV_ERR_INTERNAL -3

// A wait gave up at its time limit; the request is still in flight (its
// buffers stay the store's) and may be waited for again.
#define PSKV_ERR_TIMEOUT -4

// The argument is valid but this build of pskv cannot do it yet (a dtype
// without kernels, ...).
#define PSKV_ERR_UNSUPPORTED -5

// dtype code: 32-bit float (MXNet's codes throughout).
#define PSKV_FLOAT32 0

// dtype code: 64-bit float.
#define PSKV_FLOAT64 1

// dtype code: IEEE half precision.
#define PSKV_FLOAT16 2

// dtype code: 32-bit signed integer.
#define PSKV_INT32 4

// dtype code: 64-bit signed integer.
#define PSKV_INT64 6

// dtype code: bfloat16 (no kernels yet: `PSKV_ERR_UNSUPPORTED`).
#define PSKV_BFLOAT16 12

// Device type: host memory (DLPack's codes throughout).
#define PSKV_DEVICE_CPU 1

// Device type: memory of GPU `device_id` (a CUDA device pointer; without
// a GPU, or with `PSKV_GPU=emulated`, the emulated device, whose device
// pointers are host addresses).
#define PSKV_DEVICE_GPU 2

// Device type: host memory pinned for GPU copies (`cudaMallocHost`);
// used as host memory.
#define PSKV_DEVICE_CPU_PINNED 3

// A kvstore and the engine it schedules on (opaque to C: a handle is a
// token for one of these, see the module docs).
typedef struct pskv_kvstore pskv_kvstore;

// A request (opaque to C: a handle is a token for one of these).
typedef struct pskv_request pskv_request;

// The caller's memory: `count` elements of `dtype` at `data`, on
// `device_type` (`device_id`: the GPU's number, else 0), of shape
// `shape[0..ndim]` (row-major; its product is `count`), or 1-D when `ndim`
// is 0 (then `shape` may be NULL). Host memory must be aligned for its
// dtype; GPU memory to 8 bytes. An initialized key takes the shape of its
// init value; later buffers of the key may leave the shape out.
typedef struct pskv_buffer {
  // The first element.
  void *data;
  // The number of elements.
  uint64_t count;
  // A `PSKV_FLOAT32`... dtype code.
  int32_t dtype;
  // A `PSKV_DEVICE_*` type.
  int32_t device_type;
  // The GPU's number for `PSKV_DEVICE_GPU`; 0 otherwise.
  int32_t device_id;
  // The number of dimensions (0: 1-D of `count` elements).
  int32_t ndim;
  // `ndim` dimensions, or NULL when `ndim` is 0.
  const int64_t *shape;
} pskv_buffer;

// A custom update rule in C: applies the gradient `grad` of `key` to the
// stored `weight` (both in host memory, the key's dtype and full length;
// `weight` is written in place). A row-sparse gradient holds only rows
// `grad_rows[0..grad_nrows]`, packed (`grad->count` is their elements);
// for a dense one `grad_rows` is NULL and `grad_nrows` 0. Returns 0, or
// any other value to fail the push (its request reports it).
//
// Called on pskv's threads, for several keys at once but never twice at
// once for one key; it must not call back into the same store.
typedef int (*pskv_updater)(int64_t key,
                            const struct pskv_buffer *grad,
                            const int64_t *grad_rows,
                            size_t grad_nrows,
                            struct pskv_buffer *weight,
                            void *user);

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the calling thread's last error ("" if none). The pointer
// stays valid until this thread's next failing call.
const char *pskv_last_error(void);

// The ABI version of the library (`PSKV_ABI_VERSION` of the header it was
// built with). A program compares it with its header's at start-up.
int pskv_abi_version(void);

// The library's version, "MAJOR.MINOR.PATCH" (a static string).
const char *pskv_version(void);

// Initializes `key` (0 to 2^32-1) with `len` floats.
//
// # Safety
// `kv` is a live handle; `data` points to `len` floats.
int pskv_init(struct pskv_kvstore *kv, int64_t key, const float *data, size_t len);

// Pushes `len` floats to `key` (copied; returns once scheduled).
//
// # Safety
// `kv` is a live handle; `data` points to `len` floats.
int pskv_push(struct pskv_kvstore *kv, int64_t key, const float *data, size_t len, int priority);

// Pulls `key`'s value into `out` (`len` floats); returns once `out` holds
// it, after every push of this handle before it.
//
// # Safety
// `kv` is a live handle; `out` points to `len` writable floats.
int pskv_pull(struct pskv_kvstore *kv, int64_t key, float *out, size_t len, int priority);

// Pushes `data` and pulls the result into `out` (one round trip in a
// distributed store); `data` and `out` may be the same buffer.
//
// # Safety
// `kv` is a live handle; `data` and `out` point to `len` floats.
int pskv_pushpull(struct pskv_kvstore *kv,
                  int64_t key,
                  const float *data,
                  float *out,
                  size_t len,
                  int priority);

// Initializes `key` with `len` elements of device memory (see
// `pskv_push_device` for the arguments).
//
// # Safety
// As `pskv_push_device`.
int pskv_init_device(struct pskv_kvstore *kv,
                     int64_t key,
                     const void *data,
                     size_t len,
                     int dtype,
                     int device);

// Pushes `len` elements of dtype code `dtype` (MXNet's: 0 float32, 1
// float64, 2 float16, 4 int32, 6 int64) that live on GPU `device` at
// `data` (a CUDA device pointer, 8-byte aligned; on the emulated device,
// `PSKV_GPU=emulated` or no GPU, a host address). The values are copied on
// the device before the call returns (`data` may then be reused); the
// push itself is scheduled, as `pskv_push`'s.
//
// # Safety
// `kv` is a live handle; `data` is `len` elements of device memory of
// GPU `device`, not written until the call returns.
int pskv_push_device(struct pskv_kvstore *kv,
                     int64_t key,
                     const void *data,
                     size_t len,
                     int dtype,
                     int device,
                     int priority);

// Pulls `key`'s value into device memory `out` (as `pskv_push_device`'s
// `data`); returns once `out` holds it.
//
// # Safety
// `kv` is a live handle; `out` is `len` elements of device memory of GPU
// `device`, not touched by the caller until the call returns.
int pskv_pull_device(struct pskv_kvstore *kv,
                     int64_t key,
                     void *out,
                     size_t len,
                     int dtype,
                     int device,
                     int priority);

// Pushes device memory `data` and pulls the result into device memory
// `out` (both as `pskv_push_device`'s `data`; they may be the same).
//
// # Safety
// As `pskv_push_device` and `pskv_pull_device`.
int pskv_pushpull_device(struct pskv_kvstore *kv,
                         int64_t key,
                         const void *data,
                         void *out,
                         size_t len,
                         int dtype,
                         int device,
                         int priority);

// Makes a persistent push of `n` keys: `values[i]` to `keys[i]` at
// priority `priorities[i]` (null: 0 each), as `pskv_push_async` issues
// it, each time `pskv_start` starts it; writes the request to
// `*request`, inactive. The buffers are checked and recorded now; the
// values are read in place at each start: leave them alone from a start
// until its wait reports it. Free it with `pskv_request_free`.
//
// # Safety
// `kv` is a live handle; `keys`, `values` and `priorities` (unless null)
// point to `n` items; each buffer is as `pskv_buffer` describes and stays
// valid until the request is freed; `request` points to writable storage.
int pskv_push_persistent(struct pskv_kvstore *kv,
                         size_t n,
                         const int64_t *keys,
                         const struct pskv_buffer *values,
                         const int *priorities,
                         struct pskv_request **request);

// Makes a persistent pull of `n` keys into `outs`, as `pskv_pull_async`
// issues it, each time `pskv_start` starts it (see
// `pskv_push_persistent`).
//
// # Safety
// As `pskv_push_persistent`, with `outs` for `values`.
int pskv_pull_persistent(struct pskv_kvstore *kv,
                         size_t n,
                         const int64_t *keys,
                         const struct pskv_buffer *outs,
                         const int *priorities,
                         struct pskv_request **request);

// Makes a persistent push-pull of `n` keys, `values[i]` into `outs[i]`,
// as `pskv_pushpull_async` issues it, each time `pskv_start` starts it
// (see `pskv_push_persistent`).
//
// # Safety
// As `pskv_push_persistent`, with `outs` as well.
int pskv_pushpull_persistent(struct pskv_kvstore *kv,
                             size_t n,
                             const int64_t *keys,
                             const struct pskv_buffer *values,
                             const struct pskv_buffer *outs,
                             const int *priorities,
                             struct pskv_request **request);

// Starts a persistent request: issues its batch as its `pskv_*_async`
// call would, on the buffers it was made with. Report it with
// `pskv_wait`, `pskv_test` or `pskv_wait_all` before starting it again.
// A start that fails part way returns the error once the keys it issued
// are done, and the request is inactive again (unless they were still in
// flight at the timeout: then it stays started; the error says so).
//
// # Safety
// Any value may be passed (handles are checked).
int pskv_start(struct pskv_request *request);

// Starts `n` persistent requests, in order, as `pskv_start` each; stops
// at the first that fails and returns its error, naming it (the requests
// before it are started: report them).
//
// # Safety
// `requests` points to `n` handles (any values).
int pskv_start_all(size_t n, struct pskv_request *const *requests);

// Frees a persistent request that is not started (or whose start was
// reported). Freeing a started one is an argument error (wait for it
// first); a request of a `pskv_*_async` call is freed by the wait that
// reports it, not here. Null is accepted.
//
// # Safety
// Any value may be passed (handles are checked).
int pskv_request_free(struct pskv_request *request);

// Pushes `n` keys: `values[i]` to `keys[i]` at priority `priorities[i]`
// (null: 0 each; higher goes first), and writes the request to
// `*request`. A key given twice has its values summed, as in MXNet. The
// values are read in place: do not write them until the request is done.
//
// # Safety
// `kv` is a live handle; `keys`, `values` and `priorities` (unless null)
// point to `n` items; each buffer is as `pskv_buffer` describes and stays
// valid until the request is done; `request` points to writable storage.
int pskv_push_async(struct pskv_kvstore *kv,
                    size_t n,
                    const int64_t *keys,
                    const struct pskv_buffer *values,
                    const int *priorities,
                    struct pskv_request **request);

// Pulls `n` keys: `keys[i]`'s value into `outs[i]`, after every push of
// this store issued before it, and writes the request to `*request`.
// The outputs hold the values once the request is done; do not read or
// write them before.
//
// # Safety
// As `pskv_push_async`, with `outs` for `values`.
int pskv_pull_async(struct pskv_kvstore *kv,
                    size_t n,
                    const int64_t *keys,
                    const struct pskv_buffer *outs,
                    const int *priorities,
                    struct pskv_request **request);

// Pushes `values[i]` to `keys[i]` and pulls the result into `outs[i]`
// (one round trip per key in a distributed store); `values[i]` and
// `outs[i]` may be the same memory. Each key at most once.
//
// # Safety
// As `pskv_push_async` and `pskv_pull_async`.
int pskv_pushpull_async(struct pskv_kvstore *kv,
                        size_t n,
                        const int64_t *keys,
                        const struct pskv_buffer *values,
                        const struct pskv_buffer *outs,
                        const int *priorities,
                        struct pskv_request **request);

// Pulls rows `row_ids[0..nrows]` (any order, repeats allowed) of `key`
// into `out`, `nrows` rows of the key's row length (the elements of one
// row of its first dimension): row `i` of `out` is row `row_ids[i]`, as
// MXNet's `row_sparse_pull` gives them (an embedding lookup). `row_ids`
// is copied before the call returns; `out` is host memory (CPU or
// pinned), used as `pskv_pull_async`'s outputs are.
//
// # Safety
// `kv` is a live handle; `row_ids` points to `nrows` ids; `out` to one
// buffer as `pskv_buffer` describes; `request` to writable storage.
int pskv_pull_rows_async(struct pskv_kvstore *kv,
                         int64_t key,
                         const int64_t *row_ids,
                         size_t nrows,
                         const struct pskv_buffer *out,
                         int priority,
                         struct pskv_request **request);

// Initializes `n` keys at once: `keys[i]` with `values[i]` (its dtype
// and element count are the key's from now on). Collective, as
// `pskv_init`, with one barrier for the whole batch instead of one per
// key. Returns when the keys are initialized; the values may be reused
// then.
//
// # Safety
// `kv` is a live handle; `keys` and `values` point to `n` items; each
// buffer is as `pskv_buffer` describes.
int pskv_init_batch(struct pskv_kvstore *kv,
                    size_t n,
                    const int64_t *keys,
                    const struct pskv_buffer *values);

// Creates a kvstore of `kind` ("local", "device", "dist_sync",
// "dist_async", ...) on an engine of its own, configured from the
// environment (a distributed kind joins the cluster named by DMLC_*, as
// set by `pskv launch`). Writes the handle to `*out`.
//
// # Safety
// `kind` is a NUL-terminated string; `out` points to writable storage.
int pskv_create(const char *kind, struct pskv_kvstore **out);

// Gives `key`'s push buffer in `*out`: host memory for the key's values
// (its element count and dtype, 1-D: `ndim` 0), zeroed, that the store
// owns until `pskv_free`. Write a gradient there and give `out` as the
// values of the key's pushes and push-pulls: where the key's values
// cross shared memory to its servers (`dist_sync`, servers on this host,
// `PSKV_VAN=shm`), the memory is this worker's slots of the key's
// segments and a push from it copies nothing; elsewhere it is ordinary
// memory and pushes from it are as from any buffer. `*shared` (if not
// NULL) is set to 1 in the first case, 0 in the second. Calling it again
// for the key, from any thread (first calls at once too: one makes it,
// the others wait for it), gives the same buffer. As any buffer, leave it
// alone while a request that uses it runs. A push or push-pull from it through its
// slots that fails moves it off them (the same bytes at the same address,
// on private pages: the server may still read the slots; should that
// remap fail, the error is logged and the buffer stays shared), and
// pushes from it then copy. The key must be initialized, and dense.
//
// # Safety
// `kv` is a live handle; `out` points to writable storage; `shared` is
// NULL or points to writable storage.
int pskv_push_buffer(struct pskv_kvstore *kv, int64_t key, struct pskv_buffer *out, int *shared);

// Waits for the store's operations, leaves the cluster (rank 0 stops the
// servers after a barrier) and frees the handle. Null is accepted; a
// handle freed already is an argument error.
//
// # Safety
// Any value may be passed (handles are checked).
int pskv_free(struct pskv_kvstore *kv);

// Sets the optimizer the servers (or a local store) run on pushes: `name`
// is sgd, nag, adam or adagrad; `params` is "" or comma-separated
// `name=value` pairs with MXNet's names (learning_rate, momentum, wd,
// rescale_grad, clip_gradient, beta1, beta2, epsilon, begin_num_update),
// and optionally `lr_scheduler=KIND(name=value;...)` with MXNet's
// scheduler and argument names, e.g.
// `learning_rate=0.1,lr_scheduler=factor(step=100;factor=0.9;warmup_steps=10)`
// or `lr_scheduler=multifactor(step=30:60:90;factor=0.1)`; kinds are
// factor, multifactor, poly and cosine. MXNet's attributes pass as they
// are: `lazy_update=1` and AdaGrad's `float_stable_eps` take effect
// (`lazy_update=0` is refused); `aggregate_num`, `use_fused_step`,
// `param_idx2name`, `idx2name`, `param_dict` and `sym` are ignored with a
// logged warning, whatever their value (without a comma).
//
// Collective, as `pskv_init` and `pskv_barrier`: every worker calls it
// with the same optimizer; if it fails on one worker it fails on all.
// Workers in another collective call meanwhile fail with it at once,
// naming both calls. If some workers never call it (MXNet code that calls
// it on rank 0 only), the callers fail at `PSKV_KVSTORE_TIMEOUT` saying the
// others did not make the call; the others' pushes and pulls left waiting
// fail at their timeout naming the call, and their next collective call
// fails at once.
//
// # Safety
// `kv` is a live handle; `name` and `params` are NUL-terminated strings.
int pskv_set_optimizer(struct pskv_kvstore *kv, const char *name, const char *params);

// Sets gradient compression (`device` and distributed stores), as
// MXNet's `set_gradient_compression`: `params` is `type=2bit`,
// `type=1bit` or `type=none`, optionally with `,threshold=T` (default
// 0.5). Pushes of float32 keys are then quantized with error feedback.
// Collective in a distributed store: every worker sets the same.
//
// # Safety
// `kv` is a live handle; `params` is a NUL-terminated string.
int pskv_set_gradient_compression(struct pskv_kvstore *kv, const char *params);

// Writes the optimizer state of every key (the servers', in a
// distributed store) to the file `path`. Waits for the store's
// operations first.
//
// # Safety
// `kv` is a live handle; `path` is a NUL-terminated string.
int pskv_save_optimizer_states(struct pskv_kvstore *kv, const char *path);

// Reads optimizer state written by `pskv_save_optimizer_states` (the
// keys must exist with the same sizes, and an optimizer must be set).
//
// # Safety
// `kv` is a live handle; `path` is a NUL-terminated string.
int pskv_load_optimizer_states(struct pskv_kvstore *kv, const char *path);

// Writes to `*out` the number of nodes (servers and workers) that have
// missed their heartbeats for `timeout_sec` seconds (0 for a local
// store), as MXNet's `get_num_dead_node`.
//
// # Safety
// `kv` is a live handle; `out` points to writable storage.
int pskv_num_dead_nodes(const struct pskv_kvstore *kv, int timeout_sec, int *out);

// Sets a custom update rule (see `pskv_updater`), as MXNet's
// `set_updater`: it runs where the weights are (in a distributed store,
// on every worker; the servers then only sum). `user` is passed to every
// call as it is; it must stay valid until the store is freed.
//
// # Safety
// `kv` is a live handle; `updater` is a function as `pskv_updater`
// describes, safe to call from any thread with `user`.
int pskv_set_updater(struct pskv_kvstore *kv, pskv_updater updater, void *user);

// Waits until every worker reached the barrier.
//
// # Safety
// `kv` is a live handle.
int pskv_barrier(struct pskv_kvstore *kv);

// Writes this worker's rank (0 for a local store) to `*out`.
//
// # Safety
// `kv` is a live handle; `out` points to writable storage.
int pskv_rank(const struct pskv_kvstore *kv, int *out);

// Writes the number of workers (1 for a local store) to `*out`.
//
// # Safety
// `kv` is a live handle; `out` points to writable storage.
int pskv_num_workers(const struct pskv_kvstore *kv, int *out);

// Waits until `request` is done and returns its result (`PSKV_OK` or
// its error), once: the handle is freed then, and waiting again is an
// argument error. Waits at most `PSKV_KVSTORE_TIMEOUT`; a wait that gives
// up returns `PSKV_ERR_TIMEOUT` and leaves the request in flight (its
// buffers still the store's): wait again. A persistent request is
// reported the same way, once per start, and then is inactive, not freed
// (`pskv_start` it again, or `pskv_request_free` it); waiting for one not
// started is an argument error.
//
// # Safety
// Any value may be passed (handles are checked).
int pskv_wait(struct pskv_request *request);

// Whether `request` is done, without waiting: writes 1 to `*done` and
// returns the request's result (then the handle is freed, as by
// `pskv_wait`), or writes 0 and returns `PSKV_OK`.
//
// # Safety
// `done` points to writable storage; any `request` may be passed.
int pskv_test(struct pskv_request *request, int *done);

// Waits for `n` requests, as `pskv_wait` each: writes each one's result
// to `statuses[i]` (unless `statuses` is null) and returns `PSKV_OK` if
// all succeeded, else the first failure's code (its message is
// `pskv_last_error()`). Every request is waited for, whatever the others
// gave.
//
// # Safety
// `requests` points to `n` handles (any values); `statuses` is null or
// points to `n` writable ints.
int pskv_wait_all(size_t n, struct pskv_request *const *requests, int *statuses);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* PSKV_H */
