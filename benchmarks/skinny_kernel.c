/* An experiment for issue #4 (not part of the package): scores of N x D base vectors against
 * queries in groups of 16, without packing the base: a 6-row x 16-query block of AVX2
 * accumulators (12 registers), each base element broadcast once, queries packed per call as
 * [group][d][16], and a software prefetch PF blocks of 6 rows ahead. No top-k.
 * Built and timed by benchmarks/skinny_kernel.py. Kept as the record of why the packaged kernel
 * (retrieval/_skinny.c) reads a packed base instead: this one stalls at 16 queries. */
#include <immintrin.h>
#include <stdint.h>
/* S[i][g*16 + j] = X[i] . Q[g*16 + j] for rows i in [0, n); Qp packed as [g][d][16]. */
#ifndef PF
#define PF 2
#endif
void scores16(const float* X, int64_t n, int d, const float* Qp, int ngroups, float* S) {
    const int ldS = ngroups * 16;
    int64_t i = 0;
    for (; i + 6 <= n; i += 6) {
        const float* x0 = X + (i + 0) * d; const float* x1 = X + (i + 1) * d;
        const float* x2 = X + (i + 2) * d; const float* x3 = X + (i + 3) * d;
        const float* x4 = X + (i + 4) * d; const float* x5 = X + (i + 5) * d;
        for (int g = 0; g < ngroups; g++) {
            const float* q = Qp + (int64_t)g * d * 16;
            __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
            __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
            __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
            __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
            __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
            __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
            for (int k = 0; k < d; k++) {
                if ((k & 15) == 0 && g == 0) {
                    const float* f = x0 + (int64_t)PF * 6 * d + k;
                    _mm_prefetch((const char*)f, _MM_HINT_T0); _mm_prefetch((const char*)(f + d), _MM_HINT_T0);
                    _mm_prefetch((const char*)(f + 2 * d), _MM_HINT_T0); _mm_prefetch((const char*)(f + 3 * d), _MM_HINT_T0);
                    _mm_prefetch((const char*)(f + 4 * d), _MM_HINT_T0); _mm_prefetch((const char*)(f + 5 * d), _MM_HINT_T0);
                }
                __m256 b0 = _mm256_loadu_ps(q + k * 16), b1 = _mm256_loadu_ps(q + k * 16 + 8);
                __m256 a;
                a = _mm256_broadcast_ss(x0 + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
                a = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
                a = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
                a = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
                a = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
                a = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
            }
            float* s = S + i * ldS + g * 16;
            _mm256_storeu_ps(s + 0 * ldS, c00); _mm256_storeu_ps(s + 0 * ldS + 8, c01);
            _mm256_storeu_ps(s + 1 * ldS, c10); _mm256_storeu_ps(s + 1 * ldS + 8, c11);
            _mm256_storeu_ps(s + 2 * ldS, c20); _mm256_storeu_ps(s + 2 * ldS + 8, c21);
            _mm256_storeu_ps(s + 3 * ldS, c30); _mm256_storeu_ps(s + 3 * ldS + 8, c31);
            _mm256_storeu_ps(s + 4 * ldS, c40); _mm256_storeu_ps(s + 4 * ldS + 8, c41);
            _mm256_storeu_ps(s + 5 * ldS, c50); _mm256_storeu_ps(s + 5 * ldS + 8, c51);
        }
    }
    for (; i < n; i++)
        for (int g = 0; g < ngroups; g++)
            for (int j = 0; j < 16; j++) {
                float acc = 0; const float* q = Qp + (int64_t)g * d * 16;
                for (int k = 0; k < d; k++) acc += X[i * d + k] * q[k * 16 + j];
                S[i * ldS + g * 16 + j] = acc;
            }
}
