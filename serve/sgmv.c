/* Segmented LoRA for CPU: out[row] += (x[row] @ A[slot]) @ B[slot] for many rows, each with its own slot, in one
 * call and without gathering weights. Rows that share a slot come adjacent (the caller sorts them), so each
 * block of up to BLOCK rows reads its slot's weights once. Blocks run on the caller's OpenMP team (torch's). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 8
#define MAX_RANK 256

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
        float h[BLOCK * MAX_RANK];
        const float *sa = a + slots[start] * din * rank, *sb = b + slots[start] * rank * dout;
        memset(h, 0, sizeof(float) * n * rank);
        for (int64_t k = 0; k < din; k++) {
            const float *ar = sa + k * rank;
            for (int64_t j = 0; j < n; j++) {
                float xv = x[rows[start + j] * din + k], *hj = h + j * rank;
                for (int64_t i = 0; i < rank; i++) hj[i] += xv * ar[i];
            }
        }
        for (int64_t i = 0; i < rank; i++) {
            const float *br = sb + i * dout;
            for (int64_t j = 0; j < n; j++) {
                float hv = h[j * rank + i], *o = out + rows[start + j] * dout;
                for (int64_t c = 0; c < dout; c++) o[c] += hv * br[c];
            }
        }
    }
    free(starts);
    return 0;
}
