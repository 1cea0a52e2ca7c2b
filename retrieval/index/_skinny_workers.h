/* The helper threads of retrieval/index/_skinny.c and the scan they share: `Workers` is the Python
 * type's object, so this is included once, from _skinny.c, after Python.h. The threads never
 * touch Python objects or take the GIL. */
#ifndef SKINNY_WORKERS_H
#define SKINNY_WORKERS_H
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_skinny_kernel.h"

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

#endif
