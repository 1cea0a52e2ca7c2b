/* Exact inner-product top-k for skinny products: a few dozen queries against a large base.
 *
 * The base is packed once as [ceil(N/6)][D][6] (six rows interleaved by dimension, see
 * retrieval/packed.py), so a block of six rows is one sequential stream that the hardware
 * prefetcher follows; read row by row, six streams at once run out of memory bandwidth at 16
 * queries (benchmarks/README.md, "A hand-written kernel"). Queries come packed in groups of
 * 16 as [G][D][16]. Each 6-row x 16-query block of scores lives in 12 AVX2 registers; a
 * vector compare against every query's current k-th best skips the heaps for almost all
 * blocks. A search runs with the GIL released, on the calling thread and the helper threads
 * of a `Workers` (below), each into heaps of its own that the caller merges.
 *
 * Compiled for any CPU; the kernel itself carries target("avx2,fma") and runs only where
 * `available()` says the CPU has both. Elsewhere the package uses BLAS (retrieval/exact.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "_skinny_kernel.h"

static PyObject* available(PyObject* self, PyObject* noargs) {
    return PyBool_FromLong(cpu_ok());
}

/* ---- Workers: threads that share one search's rows, and stay awake between searches ----
 *
 * A search is split into claims of GRAIN blocks, taken from one atomic counter by the caller
 * and the helpers alike, so a core slowed by the host only takes fewer claims. Helpers spin
 * for SPIN_NS after a search before they sleep, as OpenBLAS's threads do: waking a sleeping
 * vCPU costs ~0.3 ms here. Against Python threads claiming coarser ranges this saves
 * 0.19-0.29 ms per 16-query search: 19% at 6k x 512, 10% at 20k, 3% at 100k. The helpers
 * never touch Python objects, so they need no GIL. */

#define GRAIN 32         /* blocks (192 rows) per claim: ~40 us of work at 16 queries */
#define SPIN_NS 2000000L /* 2 ms */

typedef struct {
    const float* xp;
    const float* qp;
    float* thr; /* [threads][nq] each thread's k-th best per query */
    float* hs;  /* [threads][nq][k] */
    int64_t* hr;
    int64_t n, nq;
    Py_ssize_t k;
    int d, ngroups, threads;
    _Atomic int64_t next; /* next block to claim */
    _Atomic int pending;  /* helpers yet to finish */
} Job;

typedef struct Workers Workers;
typedef struct {
    Workers* w;
    int t;
} Helper;

struct Workers {
    PyObject_HEAD int threads; /* the caller and its helpers */
    int started;               /* helper threads running */
    pid_t pid;                 /* in a forked child the helpers do not exist */
    pthread_t* tids;
    Helper* helpers;
    pthread_mutex_t busy; /* held by the search the helpers work on */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic unsigned gen; /* bumped for each search */
    _Atomic int stop;
    Job job;
};

static void relax(void) {
#ifdef SKINNY_X86
    _mm_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim GRAIN blocks at a time until none are left, into thread t's heaps. */
static void claim_and_scan(Job* j, int t) {
    int64_t nblocks = (j->n + ROWS - 1) / ROWS;
    float* thr = j->thr + t * j->nq;
    float* hs = j->hs + t * j->nq * j->k;
    int64_t* hr = j->hr + t * j->nq * j->k;
    for (int64_t q = 0; q < j->nq; q++) thr[q] = hs[q * j->k];
    for (;;) {
        int64_t b = atomic_fetch_add_explicit(&j->next, GRAIN, memory_order_relaxed);
        if (b >= nblocks) break;
        int64_t hi = (b + GRAIN) * ROWS < j->n ? (b + GRAIN) * ROWS : j->n;
#ifdef SKINNY_X86
        scan(j->xp, j->n, j->d, j->qp, j->ngroups, b * ROWS, hi, j->k, thr, hs, hr);
#endif
    }
}

static unsigned wait_for_search(Workers* w, unsigned seen) {
    int64_t until = now_ns() + SPIN_NS;
    for (unsigned spins = 1;; spins++) {
        unsigned g = atomic_load_explicit(&w->gen, memory_order_acquire);
        if (g != seen || atomic_load(&w->stop)) return g;
        relax();
        if (spins % 1024 == 0 && now_ns() > until) break;
    }
    unsigned g;
    pthread_mutex_lock(&w->mu);
    while ((g = atomic_load_explicit(&w->gen, memory_order_acquire)) == seen &&
           !atomic_load(&w->stop))
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    return g;
}

static void* helper_main(void* arg) {
    Workers* w = ((Helper*)arg)->w;
    int t = ((Helper*)arg)->t;
    unsigned seen = 0; /* not gen now: a search may be posted before this thread runs */
    for (;;) {
        seen = wait_for_search(w, seen);
        if (atomic_load(&w->stop)) return NULL;
        if (t < w->job.threads) claim_and_scan(&w->job, t); /* else: this search uses fewer */
        atomic_fetch_sub_explicit(&w->job.pending, 1, memory_order_release);
    }
}

/* The caller's part of a search; GIL released. Alone when another search holds the helpers. */
static void run(Workers* w, Job* j) {
    if (j->threads == 1 || w->started == 0 || w->pid != getpid() ||
        pthread_mutex_trylock(&w->busy) != 0) {
        j->threads = 1;
        atomic_store(&j->next, 0);
        claim_and_scan(j, 0);
        return;
    }
    Job* shared = &w->job;
    shared->xp = j->xp, shared->qp = j->qp, shared->thr = j->thr, shared->hs = j->hs;
    shared->hr = j->hr, shared->n = j->n, shared->nq = j->nq, shared->k = j->k;
    shared->d = j->d, shared->ngroups = j->ngroups;
    shared->threads = j->threads < w->started + 1 ? j->threads : w->started + 1;
    atomic_store(&shared->next, 0);
    atomic_store(&shared->pending, w->started);
    atomic_fetch_add_explicit(&w->gen, 1, memory_order_release);
    pthread_mutex_lock(&w->mu);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    claim_and_scan(shared, 0);
    int64_t until = now_ns() + SPIN_NS;
    for (unsigned spins = 1; atomic_load_explicit(&shared->pending, memory_order_acquire) > 0;
         spins++) {
        relax();
        if (spins % 1024 == 0 && now_ns() > until) sched_yield(); /* a helper descheduled */
    }
    pthread_mutex_unlock(&w->busy);
}

static int too_small(Py_buffer* b, int64_t need, const char* what) {
    if (b->len >= need) return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %lld", what, b->len,
                 (long long)need);
    return 1;
}

static int check_sizes(Job* j, Py_buffer* xb, Py_buffer* qb, Py_buffer* sb, Py_buffer* rb) {
    if (j->d < 1 || j->ngroups < 1 || j->k < 1 || j->n < 0 || j->threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return -1;
    }
    /* Bounds before products, so the size checks below cannot overflow. */
    if (j->ngroups > (1 << 20) || j->d > (1 << 20) || j->threads > 1024 ||
        j->k > ((int64_t)1 << 40) / j->nq / j->threads || j->n > ((int64_t)1 << 50) / j->d) {
        PyErr_SetString(PyExc_ValueError, "sizes out of range");
        return -1;
    }
    int64_t heap = j->threads * j->nq * j->k;
    if (too_small(xb, (j->n + ROWS - 1) / ROWS * ROWS * (int64_t)j->d * 4, "packed base") ||
        too_small(qb, j->nq * j->d * 4, "queries") || too_small(sb, heap * 4, "heap scores") ||
        too_small(rb, heap * 8, "heap rows"))
        return -1;
    return 0;
}

/* topk(packed, n, d, queries, ngroups, k, heap_scores, heap_rows, threads) */
static PyObject* workers_topk(Workers* w, PyObject* args) {
    Py_buffer xb, qb, sb, rb;
    Py_ssize_t n, k;
    int d, ngroups, threads;
    if (!PyArg_ParseTuple(args, "y*niy*inw*w*i", &xb, &n, &d, &qb, &ngroups, &k, &sb, &rb,
                          &threads))
        return NULL;
    PyObject* result = NULL;
    Job j = {.xp = xb.buf, .qp = qb.buf, .hs = sb.buf, .hr = rb.buf, .n = n, .k = k, .d = d,
             .ngroups = ngroups, .threads = threads, .nq = (int64_t)ngroups * GROUP};
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX2/FMA: use the BLAS path");
        goto done;
    }
    if (check_sizes(&j, &xb, &qb, &sb, &rb)) goto done;
    j.thr = malloc(j.threads * j.nq * sizeof(float));
    if (!j.thr) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS run(w, &j);
    Py_END_ALLOW_THREADS result = Py_None;
    Py_INCREF(result);
done:
    free(j.thr);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&qb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&rb);
    return result;
}

static void workers_stop(Workers* w) {
    if (w->pid != getpid()) return; /* a forked child: its helpers were never there */
    atomic_store(&w->stop, 1);
    pthread_mutex_lock(&w->mu);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->started; i++) pthread_join(w->tids[i], NULL);
    w->started = 0;
}

static int workers_init(Workers* w, PyObject* args, PyObject* kwds) {
    int threads;
    if (!PyArg_ParseTuple(args, "i", &threads)) return -1;
    if (threads < 1 || threads > 1024) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1..1024");
        return -1;
    }
    if (w->tids) {
        PyErr_SetString(PyExc_RuntimeError, "Workers already started");
        return -1;
    }
    w->threads = threads;
    w->pid = getpid();
    w->tids = calloc(threads, sizeof(pthread_t));
    w->helpers = calloc(threads, sizeof(Helper));
    if (!w->tids || !w->helpers) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&w->busy, NULL);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    for (int t = 1; t < threads; t++) { /* a thread that cannot start: fewer helpers */
        w->helpers[w->started] = (Helper){w, t};
        if (pthread_create(&w->tids[w->started], NULL, helper_main, &w->helpers[w->started]))
            break;
        w->started++;
    }
    return 0;
}

static void workers_dealloc(Workers* w) {
    if (w->tids) {
        workers_stop(w);
        if (w->pid == getpid()) {
            pthread_mutex_destroy(&w->busy);
            pthread_mutex_destroy(&w->mu);
            pthread_cond_destroy(&w->cv);
        }
    }
    free(w->tids);
    free(w->helpers);
    Py_TYPE(w)->tp_free((PyObject*)w);
}

static PyObject* workers_threads(Workers* w, void* closure) {
    return PyLong_FromLong(w->started + 1);
}

static PyMethodDef workers_methods[] = {
    {"topk", (PyCFunction)workers_topk, METH_VARARGS,
     "topk(packed, n, d, queries, ngroups, k, heap_scores, heap_rows, threads): scan every "
     "row of a packed base into min-heaps of k per query, heap_scores and heap_rows holding "
     "one set of heaps per thread (see retrieval/packed.py)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef workers_getset[] = {
    {"threads", (getter)workers_threads, NULL, "Threads a search can use: helpers + caller.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WorkersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "retrieval._skinny.Workers",
    .tp_basicsize = sizeof(Workers),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Workers(threads): helper threads for exact searches of packed bases.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)workers_init,
    .tp_dealloc = (destructor)workers_dealloc,
    .tp_methods = workers_methods,
    .tp_getset = workers_getset,
};

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "Whether this CPU runs the kernel (AVX2 and FMA)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_skinny", NULL, -1, methods};

PyMODINIT_FUNC PyInit__skinny(void) {
    if (PyType_Ready(&WorkersType) < 0) return NULL;
    PyObject* m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&WorkersType);
    if (PyModule_AddObject(m, "Workers", (PyObject*)&WorkersType) < 0) {
        Py_DECREF(&WorkersType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
