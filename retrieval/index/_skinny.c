/* Exact inner-product top-k for skinny products: a few dozen queries against a large base.
 *
 * The base is packed once as [ceil(N/6)][D][6] (six rows interleaved by dimension, see
 * retrieval/index/packed.py), so a block of six rows is one sequential stream that the hardware
 * prefetcher follows; read row by row, six streams at once run out of memory bandwidth at 16
 * queries (benchmarks/README.md, "A hand-written kernel"). Queries come packed in groups of
 * 16 as [G][D][16]. Each 6-row x 16-query block of scores lives in 12 AVX2 registers; a
 * vector compare against every query's current k-th best skips the heaps for almost all
 * blocks. A search runs with the GIL released, on the calling thread and the helper threads
 * of a `Workers` (_skinny_workers.h), each into heaps of its own that are merged in C.
 *
 * Compiled for any CPU; the kernel itself carries target("avx2,fma") and runs only where
 * `available()` says the CPU has both. Elsewhere the package uses BLAS (retrieval/index/exact.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "_skinny_kernel.h"
#include "_skinny_workers.h" /* the helper threads and the claims they share */

static PyObject* available(PyObject* self, PyObject* noargs) {
    return PyBool_FromLong(cpu_ok());
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
     "heaps per thread, (threads, nq rounded up to 16, k); see retrieval/index/packed.py."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef workers_getset[] = {
    {"threads", (getter)workers_threads, NULL,
     "Threads a search may use, the caller included (fewer if the system refused one).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WorkersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "retrieval.index._skinny.Workers",
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
