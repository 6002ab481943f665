/* Segmented LoRA for CPU: out[row] += (x[row] @ A[slot]) @ B[slot] for many rows, each with its own slot, in one
 * call and without gathering weights. Rows that share a slot come adjacent (the caller sorts them), so each
 * block of up to BLOCK rows reads its slot's weights once. Blocks run on the caller's OpenMP team (torch's). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 8
#define MAX_RANK 256

/* One block of N rows on one slot's pair, any rank: the intermediate h goes through memory. */
static void block_any(const float *const *xs, float *const *outs, int64_t n, const float *restrict sa,
                      const float *restrict sb, int64_t din, int64_t rank, int64_t dout) {
    float h[BLOCK * MAX_RANK];
    memset(h, 0, sizeof(float) * n * rank);
    for (int64_t k = 0; k < din; k++) {
        const float *ar = sa + k * rank;
        for (int64_t j = 0; j < n; j++) {
            float xv = xs[j][k], *hj = h + j * rank;
            for (int64_t i = 0; i < rank; i++) hj[i] += xv * ar[i];
        }
    }
    for (int64_t i = 0; i < rank; i++) {
        const float *br = sb + i * dout;
        for (int64_t j = 0; j < n; j++) {
            float hv = h[j * rank + i], *o = outs[j];
            for (int64_t c = 0; c < dout; c++) o[c] += hv * br[c];
        }
    }
}

#ifdef __AVX512F__
/* The same for rank <= 16 (inlined, so that rank 16 is a constant): each row's h is one register, and each output
 * vector is read and written once. The sums run in the same order as block_any's, so both give the same bits. */
static inline __attribute__((always_inline)) void block_16(const float *const *xs, float *const *outs, int64_t n,
                                                           const float *restrict sa, const float *restrict sb,
                                                           int64_t din, int64_t rank, int64_t dout) {
    __mmask16 lanes = (__mmask16)((1u << rank) - 1);
    __m512 h[BLOCK];
    float hs[BLOCK][16];
    for (int64_t j = 0; j < n; j++) h[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < din; k++) {
        __m512 ar = _mm512_maskz_loadu_ps(lanes, sa + k * rank);
        for (int64_t j = 0; j < n; j++) h[j] = _mm512_fmadd_ps(_mm512_set1_ps(xs[j][k]), ar, h[j]);
    }
    for (int64_t j = 0; j < n; j++) _mm512_storeu_ps(hs[j], h[j]);
    int64_t c = 0;
    for (; c + 16 <= dout; c += 16) {
        __m512 acc[BLOCK];
        for (int64_t j = 0; j < n; j++) acc[j] = _mm512_loadu_ps(outs[j] + c);
        for (int64_t i = 0; i < rank; i++) {
            __m512 br = _mm512_loadu_ps(sb + i * dout + c);
            for (int64_t j = 0; j < n; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(hs[j][i]), br, acc[j]);
        }
        for (int64_t j = 0; j < n; j++) _mm512_storeu_ps(outs[j] + c, acc[j]);
    }
    for (; c < dout; c++)
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < rank; i++) outs[j][c] += hs[j][i] * sb[i * dout + c];
}
#endif

int lora_apply(const float *restrict x, float *restrict out, const int64_t *restrict rows,
                const int64_t *restrict slots, int64_t count, const float *restrict a, const float *restrict b,
                int64_t din, int64_t rank, int64_t dout) {
    int64_t *starts = malloc(sizeof(int64_t) * (count + 1)), blocks = 0;
    if (starts == NULL) return -1;
    for (int64_t start = 0; start < count;) {
        int64_t n = 1;
        while (start + n < count && n < BLOCK && slots[start + n] == slots[start]) n++;
        starts[blocks++] = start;
        start += n;
    }
    starts[blocks] = count;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t start = starts[block], n = starts[block + 1] - start;
        const float *xs[BLOCK];
        float *outs[BLOCK];
        for (int64_t j = 0; j < n; j++) {
            xs[j] = x + rows[start + j] * din;
            outs[j] = out + rows[start + j] * dout;
        }
        const float *sa = a + slots[start] * din * rank, *sb = b + slots[start] * rank * dout;
#ifdef __AVX512F__
        if (rank == 16) {  /* a constant rank: the compiler unrolls the loops over it */
            block_16(xs, outs, n, sa, sb, din, 16, dout);
            continue;
        }
        if (rank < 16) {
            block_16(xs, outs, n, sa, sb, din, rank, dout);
            continue;
        }
#endif
        block_any(xs, outs, n, sa, sb, din, rank, dout);
    }
    free(starts);
    return 0;
}
