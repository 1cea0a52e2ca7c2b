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
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_skinny_kernel.h"

static PyObject* available(PyObject* self, PyObject* noargs) {
    return PyBool_FromLong(cpu_ok());
}

/* ---- Workers: threads that share one search's rows, and stay awake between searches ----
 *
 * A search is split into claims of GRAIN blocks, taken from one atomic counter by the caller
 * and the helpers alike, so a core slowed by the host only takes fewer claims. Only the
 * helpers a search asks for are woken, each on its own condition variable, and they spin for
 * SPIN_NS after a search before they sleep again, as OpenBLAS's threads do: waking a sleeping
 * vCPU costs ~0.3 ms here. A helper that wakes after the caller has claimed everything stays
 * out (the search is "closed"), so a search never waits for a wake-up. Against the Python
 * threads this replaced (coarser ranges, no spinning), 16-query searches of 20k x 512 take
 * 8% less back to back and 45% less after 10 ms idle (2.99 against 5.49 ms, with keep_off
 * below); of 100k, 0.4-4% less. The price: an isolated search costs 1.3-2.5 ms more CPU time
 * (the spin). Helpers are started on first use and never touch Python objects, so they need
 * no GIL. */

#define GRAIN 32         /* blocks (192 rows) per claim: ~40 us of work at 16 queries, D = 512 */
#define SPIN_NS 2000000L    /* 2 ms */
#define WAIT_SPIN_NS 50000L /* 50 us */
#define MAX_THREADS 1024
#define CLOSED ((uint64_t)1 << 31) /* in `ticket`: no helper may join the search any more */

typedef struct {
    const float* xp;
    const float* qp;
    float* thr; /* [threads][nq] each thread's k-th best per query */
    float* hs;  /* [threads][nq][k] */
    int64_t* hr;
    int64_t n, nq, k;
    int d, ngroups, threads;
    _Atomic int64_t next; /* next block to claim */
} Job;

typedef struct Workers Workers;
typedef struct {
    Workers* w;
    int t; /* its heap set in a search */
    pthread_t tid;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint32_t call; /* number of the last search it was asked to join */
    int off;               /* the CPU it is kept off, or -1 */
} Helper;

struct Workers {
    PyObject_HEAD
    _Atomic int capacity; /* threads a search may use, the caller included */
    int started;  /* helpers running: helpers[0 .. started) */
    int ready;    /* `busy` is initialised */
    pid_t pid;    /* in a forked child the helpers do not exist */
    Helper* helpers;
    pthread_mutex_t busy; /* held by the search the helpers work on */
    pthread_mutex_t done_mu;
    pthread_cond_t done_cv; /* the last helper out of a closed search signals the caller */
    _Atomic int stop;
    /* (search number << 32) | CLOSED | helpers scanning: one word, so a helper joins only
     * the search it was called for, and only while it is open. */
    _Atomic uint64_t ticket;
    uint32_t search; /* number of the current search; only the holder of `busy` changes it */
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

static uint32_t wait_for_call(Helper* h, uint32_t seen) {
    int64_t until = now_ns() + SPIN_NS;
    for (unsigned spins = 1;; spins++) {
        uint32_t c = atomic_load_explicit(&h->call, memory_order_acquire);
        if (c != seen || atomic_load(&h->w->stop)) return c;
        relax();
        if (spins % 1024 == 0 && now_ns() > until) break;
    }
    uint32_t c;
    pthread_mutex_lock(&h->mu);
    while ((c = atomic_load(&h->call)) == seen && !atomic_load(&h->w->stop))
        pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    return c;
}

/* Count this helper into search `call` if that search is still open. */
static int join(Workers* w, uint32_t call) {
    uint64_t v = atomic_load_explicit(&w->ticket, memory_order_acquire);
    do {
        if ((uint32_t)(v >> 32) != call || (v & CLOSED)) return 0;
    } while (!atomic_compare_exchange_weak_explicit(&w->ticket, &v, v + 1, memory_order_acq_rel,
                                                    memory_order_acquire));
    return 1;
}

static void* helper_main(void* arg) {
    Helper* h = arg;
    uint32_t seen = 0; /* searches are numbered from 1 */
    for (;;) {
        seen = wait_for_call(h, seen);
        if (atomic_load(&h->w->stop)) return NULL;
        if (join(h->w, seen)) {
            claim_and_scan(&h->w->job, h->t);
            uint64_t v = atomic_fetch_sub_explicit(&h->w->ticket, 1, memory_order_acq_rel) - 1;
            if ((v & CLOSED) && !(v & (CLOSED - 1))) { /* the caller may be asleep */
                pthread_mutex_lock(&h->w->done_mu);
                pthread_cond_signal(&h->w->done_cv);
                pthread_mutex_unlock(&h->w->done_mu);
            }
        }
    }
}

static void call(Helper* h, uint32_t search) {
    pthread_mutex_lock(&h->mu);
    atomic_store_explicit(&h->call, search, memory_order_release);
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

/* Keep a helper off the calling thread's CPU. Woken from sleep, a helper is often put on the
 * waker's CPU by the scheduler, and then it and the caller take turns on one CPU while the
 * other idles: a 16-query search of 20k x 512 after 10 ms idle took 5.5 ms, against 2.75 ms
 * with the two threads pinned apart. One system call, only when the caller's CPU changed. */
static void keep_off(Helper* h, int cpu) {
#ifdef __linux__
    cpu_set_t mask; /* the caller's own, read again: the program may have narrowed it since */
    if (cpu < 0 || cpu >= CPU_SETSIZE || cpu == h->off ||
        sched_getaffinity(0, sizeof mask, &mask) != 0 || !CPU_ISSET(cpu, &mask) ||
        CPU_COUNT(&mask) < 2)
        return;
    CPU_CLR(cpu, &mask);
    if (pthread_setaffinity_np(h->tid, sizeof mask, &mask) == 0) h->off = cpu;
#endif
}

/* Start helpers up to `want`; fewer when the system refuses a thread (fewer from then on). */
static void start_helpers(Workers* w, int want) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the Python threads */
    while (w->started < want) {
        Helper* h = &w->helpers[w->started];
        *h = (Helper){.w = w, .t = w->started + 1, .off = -1};
        pthread_mutex_init(&h->mu, NULL);
        pthread_cond_init(&h->cv, NULL);
        if (pthread_create(&h->tid, NULL, helper_main, h)) {
            pthread_mutex_destroy(&h->mu);
            pthread_cond_destroy(&h->cv);
            atomic_store_explicit(&w->capacity, w->started + 1, memory_order_relaxed);
            break;
        }
        w->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Wait until the helpers in the closed search are done: they are on their last claim, so spin
 * for about one claim, then sleep, so that a helper sharing the caller's CPU (where keep_off
 * cannot steer it) gets to run. */
static void wait_for_helpers(Workers* w) {
    int64_t until = now_ns() + WAIT_SPIN_NS;
    for (unsigned spins = 1; spins % 64 || now_ns() < until; spins++) {
        if (!(atomic_load_explicit(&w->ticket, memory_order_acquire) & (CLOSED - 1))) return;
        relax();
    }
    pthread_mutex_lock(&w->done_mu);
    while (atomic_load_explicit(&w->ticket, memory_order_acquire) & (CLOSED - 1))
        pthread_cond_wait(&w->done_cv, &w->done_mu);
    pthread_mutex_unlock(&w->done_mu);
}

/* A search with the GIL released. Alone when another search holds the helpers. */
static void run(Workers* w, Job* j) {
    int cap = atomic_load_explicit(&w->capacity, memory_order_relaxed);
    int want = (j->threads < cap ? j->threads : cap) - 1;
    if (want < 1 || w->pid != getpid() || pthread_mutex_trylock(&w->busy) != 0) {
        claim_and_scan(j, 0);
        return;
    }
    start_helpers(w, want);
    want = want < w->started ? want : w->started;
    Job* shared = &w->job; /* no helper reads it until `ticket` below names this search */
    memcpy(shared, j, sizeof *j);
    shared->threads = want + 1;
    atomic_store_explicit(&shared->next, 0, memory_order_relaxed);
    if (++w->search == 0) w->search = 1;
    atomic_store_explicit(&w->ticket, (uint64_t)w->search << 32, memory_order_release);
#ifdef __linux__
    int cpu = sched_getcpu();
#else
    int cpu = -1;
#endif
    for (int i = 0; i < want; i++) {
        keep_off(&w->helpers[i], cpu);
        call(&w->helpers[i], w->search);
    }
    claim_and_scan(shared, 0);
    atomic_fetch_or_explicit(&w->ticket, CLOSED, memory_order_acq_rel);
    wait_for_helpers(w);
    pthread_mutex_unlock(&w->busy);
}

static int too_small(Py_buffer* b, int64_t need, const char* what) {
    if (b->len >= need) return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %lld", what, b->len,
                 (long long)need);
    return 1;
}

/* Sizes of a search of nq queries; b: packed base, queries, heap scores and rows (one set of
 * heaps per thread), result scores and rows. Fills in the job's query groups. */
static int check_sizes(Job* j, int64_t nq, Py_buffer* b) {
    if (j->d < 1 || nq < 1 || j->k < 1 || j->n < 0 || j->threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return -1;
    }
    /* Bounds before products, so the size checks below cannot overflow (nq rounded up to a
     * whole group is at most 16 nq). */
    if (nq > (1 << 24) || j->d > (1 << 20) || j->threads > MAX_THREADS ||
        j->k > ((int64_t)1 << 40) / nq / j->threads / GROUP || j->n > ((int64_t)1 << 50) / j->d) {
        PyErr_SetString(PyExc_ValueError, "sizes out of range");
        return -1;
    }
    j->ngroups = (int)((nq + GROUP - 1) / GROUP);
    j->nq = (int64_t)j->ngroups * GROUP;
    int64_t heap = j->threads * j->nq * j->k;
    if (too_small(&b[0], (j->n + ROWS - 1) / ROWS * ROWS * (int64_t)j->d * 4, "packed base") ||
        too_small(&b[1], nq * j->d * 4, "queries") || too_small(&b[2], heap * 4, "heap scores") ||
        too_small(&b[3], heap * 8, "heap rows") || too_small(&b[4], nq * j->k * 4, "scores") ||
        too_small(&b[5], nq * j->k * 8, "rows"))
        return -1;
    return 0;
}

/* One search with the GIL released: pack the queries, empty every heap, scan, merge the
 * threads' heaps into each query's k best (in C: in numpy the merge and the packing cost
 * ~0.14 ms a search, on caches the scan has just flushed). */
static void search(Workers* w, Job* j, const float* queries, int64_t nq, float* qp, Cand* buf,
                   float* out_s, int64_t* out_r) {
    pack_queries(queries, nq, j->d, qp);
    j->qp = qp;
    for (int64_t i = 0, heap = j->threads * j->nq * j->k; i < heap; i++) {
        j->hs[i] = -INFINITY;
        j->hr[i] = -1;
    }
    run(w, j);
    merge_heaps(j->hs, j->hr, j->threads, j->nq, nq, j->k, buf, out_s, out_r);
}

/* topk(packed, n, d, queries, nq, k, heap_scores, heap_rows, threads, scores, rows) */
static PyObject* workers_topk(Workers* w, PyObject* args) {
    Py_buffer b[6];
    Py_ssize_t n, nq, k;
    int d, threads;
    if (!PyArg_ParseTuple(args, "y*niy*nnw*w*iw*w*", &b[0], &n, &d, &b[1], &nq, &k, &b[2], &b[3],
                          &threads, &b[4], &b[5]))
        return NULL;
    PyObject* result = NULL;
    float* qp = NULL;
    Cand* buf = NULL;
    Job j = {.xp = b[0].buf, .hs = b[2].buf, .hr = b[3].buf, .n = n, .k = k, .d = d,
             .threads = threads};
    if (!w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Workers was not initialised");
        goto done;
    }
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX2/FMA: use the BLAS path");
        goto done;
    }
    if (check_sizes(&j, nq, b)) goto done;
    j.thr = malloc(j.threads * j.nq * sizeof(float));
    qp = malloc(j.nq * j.d * sizeof(float));
    buf = malloc(j.threads * j.k * sizeof(Cand));
    if (!j.thr || !qp || !buf) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    search(w, &j, b[1].buf, nq, qp, buf, b[4].buf, b[5].buf);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    free(j.thr);
    free(qp);
    free(buf);
    for (int i = 0; i < 6; i++) PyBuffer_Release(&b[i]);
    return result;
}

static int workers_init(Workers* w, PyObject* args, PyObject* kwds) {
    int threads;
    if (!PyArg_ParseTuple(args, "i", &threads)) return -1;
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1..%d", MAX_THREADS);
        return -1;
    }
    if (w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Workers already initialised");
        return -1;
    }
    w->helpers = calloc(threads, sizeof(Helper));
    if (!w->helpers) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&w->busy, NULL);
    pthread_mutex_init(&w->done_mu, NULL);
    pthread_cond_init(&w->done_cv, NULL);
    w->capacity = threads;
    w->pid = getpid();

    w->ready = 1;
    return 0;
}

static void workers_dealloc(Workers* w) {
    if (w->ready && w->pid == getpid()) { /* a forked child: its helpers were never there */
        atomic_store(&w->stop, 1);
        for (int i = 0; i < w->started; i++) { /* wake each to see `stop` */
            pthread_mutex_lock(&w->helpers[i].mu);
            pthread_cond_signal(&w->helpers[i].cv);
            pthread_mutex_unlock(&w->helpers[i].mu);
        }
        for (int i = 0; i < w->started; i++) {
            pthread_join(w->helpers[i].tid, NULL);
            pthread_mutex_destroy(&w->helpers[i].mu);
            pthread_cond_destroy(&w->helpers[i].cv);
        }
        pthread_mutex_destroy(&w->busy);
        pthread_mutex_destroy(&w->done_mu);
        pthread_cond_destroy(&w->done_cv);
    }
    free(w->helpers);
    Py_TYPE(w)->tp_free((PyObject*)w);
}

static PyObject* workers_threads(Workers* w, void* closure) {
    return PyLong_FromLong(atomic_load_explicit(&w->capacity, memory_order_relaxed));
}

static PyMethodDef workers_methods[] = {
    {"topk", (PyCFunction)workers_topk, METH_VARARGS,
     "topk(packed, n, d, queries, nq, k, heap_scores, heap_rows, threads, scores, rows): the "
     "k best rows of a packed base for each of nq queries (nq, d) into scores and rows (nq, k), "
     "best first, equal scores by lower row. heap_scores and heap_rows: scratch for one set of "
     "heaps per thread, (threads, nq rounded up to 16, k); see retrieval/packed.py."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef workers_getset[] = {
    {"threads", (getter)workers_threads, NULL,
     "Threads a search may use, the caller included (fewer if the system refused one).", NULL},
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
