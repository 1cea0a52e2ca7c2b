/* The kernel of retrieval/index/_skinny.c: a 6-row x 16-query register block over a packed base,
 * scanning rows [lo, hi) into per-query min-heaps, with the packing of the queries before a
 * search and the merge of the threads' heaps after it. Pure C (no Python), included once. */
#ifndef SKINNY_KERNEL_H
#define SKINNY_KERNEL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SKINNY_X86 1
#include <immintrin.h>
#endif

#define ROWS 6
#define GROUP 16

/* Min-heap of k (score, row) per query; the root [0] is the weakest kept candidate.
 * Put (s, r) in place of the root and sift it down. */
static void heap_replace_root(float* hs, int64_t* hr, int64_t k, float s, int64_t r) {
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && hs[c + 1] < hs[c]) c++;
        if (hs[c] >= s) break;
        hs[i] = hs[c];
        hr[i] = hr[c];
        i = c;
    }
    hs[i] = s;
    hr[i] = r;
}

/* Offer one 6 x 16 block of scores (row-major, `live` real rows) to the group's heaps. */
static void offer(const float* block, int live, int64_t row0, int q0, int64_t k,
                  float* thr, float* hs, int64_t* hr) {
    for (int r = 0; r < live; r++)
        for (int j = 0; j < GROUP; j++) {
            float s = block[r * GROUP + j];
            if (s > thr[q0 + j]) {
                float* h = hs + (int64_t)(q0 + j) * k;
                heap_replace_root(h, hr + (int64_t)(q0 + j) * k, k, s, row0 + r);
                thr[q0 + j] = h[0];
            }
        }
}

#ifdef SKINNY_X86
#define FMA2(c0, c1, x)                              \
    a = _mm256_broadcast_ss(x);                      \
    c0 = _mm256_fmadd_ps(a, b0, c0);                 \
    c1 = _mm256_fmadd_ps(a, b1, c1);

__attribute__((target("avx2,fma"))) static void scan(
    const float* xp, int64_t n, int d, const float* qp, int ngroups, int64_t lo, int64_t hi,
    int64_t k, float* thr, float* hs, int64_t* hr) {
    float block[ROWS * GROUP];
    for (int64_t i = lo; i < hi; i += ROWS) {
        const float* x = xp + i * d; /* block i / 6 starts at (i / 6) * d * 6 floats */
        int live = n - i < ROWS ? (int)(n - i) : ROWS;
        for (int g = 0; g < ngroups; g++) {
            const float* q = qp + (int64_t)g * d * GROUP;
            __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
            __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
            __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
            __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
            __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
            __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
            for (int t = 0; t < d; t++) {
                const __m256 b0 = _mm256_loadu_ps(q + t * GROUP);
                const __m256 b1 = _mm256_loadu_ps(q + t * GROUP + 8);
                const float* xt = x + t * ROWS;
                __m256 a;
                FMA2(c00, c01, xt + 0)
                FMA2(c10, c11, xt + 1)
                FMA2(c20, c21, xt + 2)
                FMA2(c30, c31, xt + 3)
                FMA2(c40, c41, xt + 4)
                FMA2(c50, c51, xt + 5)
            }
            /* Best score per query over the six rows, against each query's k-th best. */
            __m256 m0 = _mm256_max_ps(_mm256_max_ps(c00, c10), _mm256_max_ps(c20, c30));
            __m256 m1 = _mm256_max_ps(_mm256_max_ps(c01, c11), _mm256_max_ps(c21, c31));
            m0 = _mm256_max_ps(m0, _mm256_max_ps(c40, c50));
            m1 = _mm256_max_ps(m1, _mm256_max_ps(c41, c51));
            const __m256 t0 = _mm256_loadu_ps(thr + g * GROUP);
            const __m256 t1 = _mm256_loadu_ps(thr + g * GROUP + 8);
            if (!(_mm256_movemask_ps(_mm256_cmp_ps(m0, t0, _CMP_GT_OQ)) |
                  _mm256_movemask_ps(_mm256_cmp_ps(m1, t1, _CMP_GT_OQ))))
                continue;
            _mm256_storeu_ps(block + 0, c00), _mm256_storeu_ps(block + 8, c01);
            _mm256_storeu_ps(block + 16, c10), _mm256_storeu_ps(block + 24, c11);
            _mm256_storeu_ps(block + 32, c20), _mm256_storeu_ps(block + 40, c21);
            _mm256_storeu_ps(block + 48, c30), _mm256_storeu_ps(block + 56, c31);
            _mm256_storeu_ps(block + 64, c40), _mm256_storeu_ps(block + 72, c41);
            _mm256_storeu_ps(block + 80, c50), _mm256_storeu_ps(block + 88, c51);
            offer(block, live, i, g * GROUP, k, thr, hs, hr);
        }
    }
}
#endif

/* Queries (nq, d) as the kernel reads them: [ceil(nq / 16)][d][16], padded with zero queries
 * (their heaps are never merged). */
static void pack_queries(const float* q, int64_t nq, int d, float* qp) {
    int64_t ngroups = (nq + GROUP - 1) / GROUP;
    for (int64_t g = 0; g < ngroups; g++)
        for (int j = 0; j < GROUP; j++) {
            int64_t i = g * GROUP + j;
            for (int t = 0; t < d; t++) qp[(g * d + t) * GROUP + j] = i < nq ? q[i * d + t] : 0.0f;
        }
}

typedef struct {
    float s;
    int64_t r;
} Cand;

/* Best first, equal scores by lower row: a total order on filled heap slots, which never hold
 * NaN (a NaN score never passes the strict `s > k-th best` test) and hold each row once. */
static int cand_order(const void* a, const void* b) {
    const Cand *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return (x->r > y->r) - (x->r < y->r);
}

/* Each of the first nq queries' k best over `sets` heap sets [sets][nqp][k], into (nq, k)
 * scores and rows, padded with (-inf, -1) if fewer were found. Empty slots (the sets of
 * threads that did not take part) are left out of the sort. `buf` holds sets * k candidates. */
static void merge_heaps(const float* hs, const int64_t* hr, int sets, int64_t nqp, int64_t nq,
                        int64_t k, Cand* buf, float* out_s, int64_t* out_r) {
    for (int64_t q = 0; q < nq; q++) {
        int64_t m = 0;
        for (int t = 0; t < sets; t++)
            for (int64_t i = 0, at = (t * nqp + q) * k; i < k; i++)
                if (hr[at + i] >= 0) buf[m++] = (Cand){hs[at + i], hr[at + i]};
        qsort(buf, m, sizeof *buf, cand_order);
        for (int64_t i = 0; i < k; i++) {
            out_s[q * k + i] = i < m ? buf[i].s : -INFINITY;
            out_r[q * k + i] = i < m ? buf[i].r : -1;
        }
    }
}

static int cpu_ok(void) {
#ifdef SKINNY_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#endif
