/* Decode attention over a block cache on CPU: each row's one new query attends to its own tokens, read in place
 * through its block table, so no row pays for another's length. A task is one row and one key/value head, with the
 * query heads that share it (grouped-query attention); tasks run on the caller's OpenMP team (torch's). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int attention_decode(const float *restrict query, float *restrict out, const float *restrict keys,
                     const float *restrict values, const int64_t *restrict tables, int64_t width,
                     const int64_t *restrict lengths, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
                     int64_t block, float scale) {
    int64_t group = heads / kv_heads, failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) reduction(| : failed)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < kv_heads; g++) {
            int64_t length = lengths[r];
            float *scores = malloc(sizeof(float) * length * group);
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            const int64_t *table = tables + r * width;
            const float *q = query + (r * heads + g * group) * dim;
            for (int64_t t = 0; t < length; t++) {  /* scores[j * length + t] = q_j . k_t * scale */
                const float *k = keys + ((table[t / block] * block + t % block) * kv_heads + g) * dim;
                for (int64_t j = 0; j < group; j++) {
                    float s = 0;
#pragma omp simd reduction(+ : s)
                    for (int64_t c = 0; c < dim; c++) s += q[j * dim + c] * k[c];
                    scores[j * length + t] = s * scale;
                }
            }
            for (int64_t j = 0; j < group; j++) {  /* softmax, in place */
                float *s = scores + j * length, top = -INFINITY, sum = 0;
                for (int64_t t = 0; t < length; t++) top = s[t] > top ? s[t] : top;
                for (int64_t t = 0; t < length; t++) sum += s[t] = expf(s[t] - top);
                for (int64_t t = 0; t < length; t++) s[t] /= sum;
                float *o = out + (r * heads + g * group + j) * dim;
                for (int64_t c = 0; c < dim; c++) o[c] = 0;
            }
            for (int64_t t = 0; t < length; t++) {  /* out_j = sum_t p_jt v_t */
                const float *v = values + ((table[t / block] * block + t % block) * kv_heads + g) * dim;
                for (int64_t j = 0; j < group; j++) {
                    float p = scores[j * length + t], *o = out + (r * heads + g * group + j) * dim;
#pragma omp simd
                    for (int64_t c = 0; c < dim; c++) o[c] += p * v[c];
                }
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
