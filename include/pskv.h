/* pskv: the C ABI of a parameter-server stack for distributed training.
 *
 * Generated from src/capi.rs by cbindgen; do not edit (CI checks it is fresh).
 * Link with -lpskv (libpskv.so or libpskv.a; the static library also needs
 * -lpthread -ldl -lm). Every function returns PSKV_OK (0) or a negative
 * error code; pskv_last_error() gives the calling thread's last message. */

#ifndef PSKV_H
#define PSKV_H



#include <stddef.h>
#include <stdint.h>

// Success.
#define PSKV_OK 0

// A null pointer, a bad string or a bad length was passed.
#define PSKV_ERR_ARGUMENT -1

// The kvstore refused or failed the operation (unknown key, wrong size,
// a node that died, ...): see `pskv_last_error`.
#define PSKV_ERR_KVSTORE -2

// pskv failed internally (a caught panic): see `pskv_last_error`.
#define PSKV_ERR_INTERNAL -3

// A kvstore and the engine it schedules on (opaque to C: a handle is a
// token for one of these, see the module docs).
typedef struct pskv_kvstore pskv_kvstore;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the calling thread's last error ("" if none). The pointer
// stays valid until this thread's next failing call.
const char *pskv_last_error(void);

// Creates a kvstore of `kind` ("local", "device", "dist_sync",
// "dist_async", ...) on an engine of its own, configured from the
// environment (a distributed kind joins the cluster named by DMLC_*, as
// set by `pskv launch`). Writes the handle to `*out`.
//
// # Safety
// `kind` is a NUL-terminated string; `out` points to writable storage.
int pskv_create(const char *kind, struct pskv_kvstore **out);

// Waits for the store's operations, leaves the cluster (rank 0 stops the
// servers after a barrier) and frees the handle. Null is accepted; a
// handle freed already is an argument error.
//
// # Safety
// Any value may be passed (handles are checked).
int pskv_free(struct pskv_kvstore *kv);

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

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* PSKV_H */
