/* HSTU pointwise attention, float32, forward and backward, one pass over the keys of each query (no (T, S)
 * tensor).
 *
 * For query i of batch row b and head h, over keys j = [cached (n); new (T)]:
 *
 *     visible(i, j) = (key_valid[j] && key_pos[j] < query_pos[i] && in_window(i, j)) || j == n + i
 *     in_window(i, j) = window < 0 || key_pos[j] >= query_pos[i] - window || key_pos[j] < globals
 *     s_ij          = alpha * q_i . k_j + position_bias[pb(|query_pos[i] - key_pos[j]|)]
 *                                       + time_bias[tb(|query_time[i] - key_time[j]|)]
 *     out_i         = sum over visible j of  SiLU(s_ij) * inv_norm * scale_j * v_j
 *
 * scale_j is key_scale[b] on batch row b's n cached keys and 1 on new keys (1 everywhere when key_scale is
 * NULL). window >= 0 is Longformer's sliding window: besides itself, a query sees the keys of the last `window`
 * positions and the first `globals` positions only (window < 0: every earlier key). pb and tb are the log buckets
 * of the Python reference (malloc.models.hstu.log_bucket), read from their
 * thresholds: bucket(d) is the largest c with thresholds[c] <= d, which is the reference's bucket exactly, since
 * the reference is monotone in d.
 *
 * Layouts (all contiguous) as hstu_attention_rows reads them: q (B, H, T, dk); keys_t (B, Hk, dk, S), keys
 * transposed; values (B, Hk, S, dv); query_pos, query_time (B, T) int64; key_pos, key_time (B, Hm, S) int64;
 * key_valid (B, Hm, S) uint8 (or bool); key_scale (B) float or NULL; out (B, T, H, dv). Query head h reads key
 * head h * Hk / H and metadata head h * Hm / H (Hk and Hm divide H). The exported forward takes the stored keys
 * and the new tokens' apart and lays out each batch row this way itself (see there).
 *
 * Compiled with -ffinite-math-only (so that the min, max and floor of exp_clamped vectorise): nothing here
 * relies on infinities or NaN; a masked key gets bias 0 and mask 0, so its score stays finite.
 *
 * hstu_attention_rows computes the (b, i) rows in [row_begin, row_end) of the B * T rows, and
 * hstu_attention_backward_rows the gradients of whole batch rows; the exported hstu_attention and
 * hstu_attention_backward (at the end) run one range per thread. The forward takes up to QUERY_TILE consecutive
 * queries of a batch row at once, so that each key and value it loads serves all of them: over transposed keys
 * from registers (one query at a time, the loads, not the multiply-adds, bound the loop), over keys read in place
 * (a request) from the cache, so that a request's stored keys come from memory once, not once per query. The
 * tiles are fixed by the query index, so the outputs do not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define KEY_BLOCK 256
/* batch rows of at most this many queries (a request: its new events and candidate tokens) read the keys where
 * the model holds them; longer ones (training, prefill chunks) read a transposed copy, whose one-off cost their
 * many queries share (see the exported forward) */
#define DIRECT_ROWS 8
/* queries computed together over the transposed keys, sharing each key and value load (at most 4) */
#define QUERY_TILE 4
/* the fields of a batch row's entry in the forward's table of stored rows (see hstu_attention) */
#define ROW_FIELDS 5

/* a stored row's address, as the table of stored rows holds it */
static inline const float *stored_rows(int64_t address) { return (const float *)(intptr_t)address; }

/* the parameter lists every entry point shares (the header gives their layouts), and the same as arguments */
#define SIZE_PARAMS int64_t B, int64_t H, int64_t Hk, int64_t Hm, int64_t T, int64_t S, int64_t n, int64_t dk, \
    int64_t dv
#define META_PARAMS const int64_t *query_pos, const int64_t *query_time, const int64_t *key_pos, \
    const int64_t *key_time, const uint8_t *key_valid, const float *key_scale
#define TABLE_PARAMS const float *position_bias, const int64_t *position_thresholds, int64_t position_buckets, \
    int64_t position_octave, const float *time_bias, const int64_t *time_thresholds, int64_t time_buckets, \
    int64_t time_octave, int64_t window, int64_t globals
#define SIZE_ARGS B, H, Hk, Hm, T, S, n, dk, dv
#define META_ARGS query_pos, query_time, key_pos, key_time, key_valid, key_scale
#define TABLE_ARGS position_bias, position_thresholds, position_buckets, position_octave, time_bias, \
    time_thresholds, time_buckets, time_octave, window, globals

/* exp(x) for x in [-87, 88] (clamped outside), relative error about 2e-7: a Cephes-style reduction
 * x = n ln2 + r and a degree-6 polynomial, in plain arithmetic so that the compiler vectorises its loop */
static inline float exp_clamped(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* the largest c < buckets with thresholds[c] <= d (thresholds[0] == 0, non-decreasing). The guess
 * per_octave * floor(log2(1 + d)) plus one comparison per bucket of that octave is exact but for float rounding
 * at octave ends, which the two loops (almost never entered) correct. */
static inline int bucket_of(int64_t d, const int64_t *thresholds, int buckets, int per_octave) {
    int base = per_octave * (63 - __builtin_clzll((uint64_t)d + 1));
    if (base > buckets - 1) base = buckets - 1;
    int c = base;
    for (int step = 1; step < per_octave && base + step < buckets; step++) c += thresholds[base + step] <= d;
    while (c + 1 < buckets && thresholds[c + 1] <= d) c++;
    while (c > 0 && thresholds[c] > d) c--;
    return c;
}

static inline int64_t distance(int64_t a, int64_t b) { return a > b ? a - b : b - a; }

static inline float silu(float s) { return s / (1.0f + exp_clamped(-s)); }

/* VLEN floats, one vector register of the target (16 with AVX-512, else 8); memcpy loads and stores them from
 * unaligned addresses (GCC's vector extension: whatever SIMD the target has). With AVX-512 the wide vectors halve
 * the instructions of every loop (on AMD Zen 4, which splits each into two 256-bit halves, the kernel still runs
 * a fifth faster); without it, 8 keep every sum below in a register. */
#ifdef __AVX512F__
#define VLEN 16
#else
#define VLEN 8
#endif
typedef float vf __attribute__((vector_size(4 * VLEN)));

static inline vf loadv(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }

static inline void storev(float *p, vf x) { memcpy(p, &x, sizeof x); }

/* eight floats, for a dot product summed across its lanes alone (row_scores' last keys) */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f x; memcpy(&x, p, sizeof x); return x; }

/* The lane sums of VLEN vectors at once: out[l] = sum over the lanes of x[l]. Each step adds, within blocks of 2h
 * lanes, the lower h lanes of a pair of vectors to their upper h lanes, so that one vector holds half of each
 * of two vectors' sums; after log2(VLEN) steps lane l holds the sum of x[bit-reversed l], which one last shuffle
 * puts in order. VLEN - 1 adds and 2 VLEN - 1 shuffles for VLEN sums, instead of VLEN - 1 adds per sum. */
#if defined(__clang__) || __GNUC__ >= 12  /* __builtin_shufflevector; older compilers sum key by key */
#define LANE_SUMS 1
#define FOLD(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
static inline vf lane_sums(vf *x) {
#if VLEN == 16
    for (int i = 0; i < 8; i++)
        x[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + FOLD(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        x[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + FOLD(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        x[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + FOLD(x[2 * i], x[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    vf total = FOLD(x[0], x[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
             + FOLD(x[0], x[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    return FOLD(total, total, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
#else
    for (int i = 0; i < 4; i++)
        x[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + FOLD(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)
        x[i] = FOLD(x[2 * i], x[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
             + FOLD(x[2 * i], x[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    vf total = FOLD(x[0], x[1], 0, 8, 2, 10, 4, 12, 6, 14) + FOLD(x[0], x[1], 1, 9, 3, 11, 5, 13, 7, 15);
    return FOLD(total, total, 0, 4, 2, 6, 1, 5, 3, 7);
#endif
}
#endif

/* For each of NQ queries q: scores[q * KEY_BLOCK + j] = bias[q * bias_stride + j] + sum_d qs[q * DK + d] *
 * keys_t[d * S + j] for j < width (bias NULL: 0). Each load of a key column serves the NQ queries, and eight
 * independent vf sums are in flight (one alone would wait on each multiply-add's latency): 8 VLEN / NQ keys at a
 * time, then VLEN at a time, the rest one by one. The queries' rows sit at fixed strides so that the loops address
 * them from one register each. */
static inline __attribute__((always_inline)) void block_scores(
    const int NQ, const int64_t DK, int64_t S, int64_t width, const float *qs, const float *keys_t,
    const float *bias, int64_t bias_stride, float *scores)
{
    const int R = 8 / NQ;  /* vf sums per query: sum r of query q is s[q * R + r] */
    int64_t j = 0;
    for (; j + VLEN * R <= width; j += VLEN * R) {
        vf s[8], k[8];
        for (int q = 0; q < NQ; q++)
            for (int r = 0; r < R; r++) s[q * R + r] = bias ? loadv(bias + q * bias_stride + j + VLEN * r) : (vf){0};
        for (int64_t d = 0; d < DK; d++) {
            const float *column = keys_t + d * S + j;
            for (int r = 0; r < R; r++) k[r] = loadv(column + VLEN * r);
            for (int q = 0; q < NQ; q++) {
                vf qd = (vf){0} + qs[q * DK + d];
                for (int r = 0; r < R; r++) s[q * R + r] += qd * k[r];
            }
        }
        for (int q = 0; q < NQ; q++)
            for (int r = 0; r < R; r++) storev(scores + q * KEY_BLOCK + j + VLEN * r, s[q * R + r]);
    }
    for (; j + VLEN <= width; j += VLEN)
        for (int q = 0; q < NQ; q++) {
            vf s0 = bias ? loadv(bias + q * bias_stride + j) : (vf){0};
            for (int64_t d = 0; d < DK; d++) s0 += ((vf){0} + qs[q * DK + d]) * loadv(keys_t + d * S + j);
            storev(scores + q * KEY_BLOCK + j, s0);
        }
    for (; j < width; j++)
        for (int q = 0; q < NQ; q++) {
            float s0 = bias ? bias[q * bias_stride + j] : 0.0f;
            for (int64_t d = 0; d < DK; d++) s0 += qs[q * DK + d] * keys_t[d * S + j];
            scores[q * KEY_BLOCK + j] = s0;
        }
}

/* For each of NQ queries q: acc[q * DV + d] += sum_j scores[q * KEY_BLOCK + j] * values[j * DV + d] for j < width.
 * With DV a multiple of VLEN, each load of a value row serves the NQ queries, 4 / NQ keys at a time on
 * independent sets of vf sums, added at the end. */
static inline __attribute__((always_inline)) void block_values(
    const int NQ, const int64_t DV, int64_t width, const float *scores, const float *values, float *acc)
{
    const int K = 4 / NQ;  /* keys per step: the sums of query q and key r of a step are sums[q * K + r] */
    int64_t j = 0;
    if (DV % VLEN == 0) {
        vf sums[4][DV / VLEN > 0 ? DV / VLEN : 1];
        for (int r = 0; r < 4; r++)
            for (int64_t c = 0; c < DV / VLEN; c++) sums[r][c] = (vf){0};
        for (; j + K <= width; j += K)
            for (int r = 0; r < K; r++)
                for (int64_t c = 0; c < DV / VLEN; c++) {
                    vf v = loadv(values + (j + r) * DV + VLEN * c);
                    for (int q = 0; q < NQ; q++) sums[q * K + r][c] += ((vf){0} + scores[q * KEY_BLOCK + j + r]) * v;
                }
        for (int q = 0; q < NQ; q++)
            for (int64_t c = 0; c < DV / VLEN; c++) {
                vf total = sums[q * K][c];
                for (int r = 1; r < K; r++) total += sums[q * K + r][c];
                storev(acc + q * DV + VLEN * c, loadv(acc + q * DV + VLEN * c) + total);
            }
    }
    for (; j < width; j++)
        for (int q = 0; q < NQ; q++)
            for (int64_t d = 0; d < DV; d++) acc[q * DV + d] += scores[q * KEY_BLOCK + j] * values[j * DV + d];
}

/* whether none of NQ queries sees any of the width keys from mask (query q's row at mask + q * row_stride): a block
 * its queries skip (keys outside a sliding window, padding); it stops at the first key seen, at once for most blocks */
static inline int block_unseen(int64_t NQ, int64_t width, const float *mask, int64_t row_stride) {
    for (int64_t q = 0; q < NQ; q++)
        for (int64_t j = 0; j < width; j++)
            if (mask[q * row_stride + j] != 0.0f) return 0;
    return 1;
}

/* The outputs of NQ queries of one head over the keys [first, last] (the union of what they see: a query's mask
 * is 0 on the keys it does not see), each plus its own (diagonal) key self + q; every key and value load serves
 * the NQ queries. Query q's input is q0 + q * DK, its bias and mask rows start at bias + q * row_stride and
 * mask + q * row_stride, its output at out + q * out_stride. DK and DV are compile-time constants where the
 * dispatch below can make them so (the loops then unroll). scores: NQ * KEY_BLOCK floats. */
static inline __attribute__((always_inline)) void head_rows(
    const int NQ, const int64_t DK, const int64_t DV, int64_t S, int64_t first, int64_t last, const float *q0,
    float alpha, const float *keys_t, const float *values, const float *bias, const float *mask, int64_t row_stride,
    int64_t self, float self_bias, float inv_norm, float *scores, float *out, int64_t out_stride)
{
    float qs[NQ * DK], acc[NQ * DV];
    for (int64_t d = 0; d < NQ * DK; d++) qs[d] = alpha * q0[d];
    for (int64_t d = 0; d < NQ * DV; d++) acc[d] = 0.0f;
    for (int64_t start = first; start <= last; start += KEY_BLOCK) {
        int64_t width = last + 1 - start < KEY_BLOCK ? last + 1 - start : KEY_BLOCK;
        if (block_unseen(NQ, width, mask + start, row_stride)) continue;
        block_scores(NQ, DK, S, width, qs, keys_t + start, bias + start, row_stride, scores);
        for (int q = 0; q < NQ; q++) {
            const float *mb = mask + q * row_stride + start;
            float *sq = scores + q * KEY_BLOCK;
            for (int64_t j = 0; j < width; j++) sq[j] = mb[j] * silu(sq[j]);
        }
        block_values(NQ, DV, width, scores, values + start * DV, acc);
    }
    for (int q = 0; q < NQ; q++) {
        float s = self_bias;  /* the diagonal: every query sees itself */
        for (int64_t d = 0; d < DK; d++) s += qs[q * DK + d] * keys_t[d * S + self + q];
        float w = inv_norm * silu(s);
        for (int64_t d = 0; d < DV; d++) out[q * out_stride + d] = acc[q * DV + d] + w * values[(self + q) * DV + d];
    }
}

/* scores[j] = bias[j] + qs . keys[j] for j < width, keys stored row by row (keys[j * DK + d]): the layout the
 * model holds, read without a transposed copy. Each dot product is summed across its vector's lanes: VLEN keys at
 * a time through lane_sums where DK is a multiple of VLEN, the rest key by key. */
static inline __attribute__((always_inline)) void row_scores(
    const int64_t DK, int64_t width, const float *qs, const float *keys, const float *bias, float *scores)
{
#ifdef LANE_SUMS
    if (DK % VLEN == 0) {
        const int64_t C = DK / VLEN > 0 ? DK / VLEN : 1;
        vf qv[C];
        for (int64_t c = 0; c < DK / VLEN; c++) qv[c] = loadv(qs + VLEN * c);
        int64_t j = 0;
        for (; j + VLEN <= width; j += VLEN) {
            vf products[VLEN];
            for (int r = 0; r < VLEN; r++) {
                vf sum = qv[0] * loadv(keys + (j + r) * DK);
                for (int64_t c = 1; c < DK / VLEN; c++) sum += qv[c] * loadv(keys + (j + r) * DK + VLEN * c);
                products[r] = sum;
            }
            storev(scores + j, loadv(bias + j) + lane_sums(products));
        }
        keys += j * DK; bias += j; scores += j; width -= j;
    }
#endif
    if (DK % 8 == 0) {
        v8f q8[DK / 8 > 0 ? DK / 8 : 1];
        for (int64_t c = 0; c < DK / 8; c++) q8[c] = load8(qs + 8 * c);
        for (int64_t j = 0; j < width; j++) {
            v8f sum = (v8f){0};
            for (int64_t c = 0; c < DK / 8; c++) sum += q8[c] * load8(keys + j * DK + 8 * c);
            scores[j] = bias[j] + (((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7])));
        }
        return;
    }
    for (int64_t j = 0; j < width; j++) {
        float s = bias[j];
        for (int64_t d = 0; d < DK; d++) s += qs[d] * keys[j * DK + d];
        scores[j] = s;
    }
}

/* head_rows over keys read where the model holds them, for NQ (at most QUERY_TILE) queries of one batch row: the n
 * stored keys and values (rows of DK and DV) of this head, then the new tokens' (query q's own key is new key
 * i + q), over the keys [first, last] (the union of what they see: a query's mask is 0 on the keys it does not
 * see). Each block of keys is read from memory once for the NQ queries (the later ones find it in the cache);
 * each query's sums are those it would get alone over the same blocks. No block crosses from stored to new keys.
 * Query q's input, bias, mask and output are at q0 + q * DK, bias/mask + q * row_stride and out + q * out_stride,
 * as in head_rows. */
static inline __attribute__((always_inline)) void head_rows_direct(
    const int64_t DK, const int64_t DV, int64_t NQ, int64_t n, int64_t stored, int64_t first, int64_t last,
    const float *q0,
    float alpha, const float *cached_keys, const float *cached_values, const float *new_keys,
    const float *new_values, const float *bias, const float *mask, int64_t row_stride, int64_t i, float self_bias,
    float inv_norm, float *scores, float *out, int64_t out_stride)
{
    float qs[QUERY_TILE * DK], acc[QUERY_TILE * DV];
    for (int64_t d = 0; d < NQ * DK; d++) qs[d] = alpha * q0[d];
    for (int64_t d = 0; d < NQ * DV; d++) acc[d] = 0.0f;
    for (int64_t start = first, stop; start <= last; start = stop) {
        if (start >= stored && start < n) {  /* padding past this row's stored keys: unseen, and not there to read */
            stop = n;
            continue;
        }
        stop = start + KEY_BLOCK < last + 1 ? start + KEY_BLOCK : last + 1;
        if (start < stored && stop > stored) stop = stored;
        if (start < n && stop > n) stop = n;
        int64_t width = stop - start;
        if (block_unseen(NQ, width, mask + start, row_stride)) continue;
        const float *k = start < n ? cached_keys + start * DK : new_keys + (start - n) * DK;
        const float *v = start < n ? cached_values + start * DV : new_values + (start - n) * DV;
        for (int64_t q = 0; q < NQ; q++) {
            row_scores(DK, width, qs + q * DK, k, bias + q * row_stride + start, scores);
            const float *mb = mask + q * row_stride + start;
            for (int64_t j = 0; j < width; j++) scores[j] = mb[j] * silu(scores[j]);
            block_values(1, DV, width, scores, v, acc + q * DV);
        }
    }
    for (int64_t q = 0; q < NQ; q++) {
        const float *own_key = new_keys + (i + q) * DK, *own_value = new_values + (i + q) * DV;
        float s = self_bias;  /* the diagonal: every query sees itself */
        for (int64_t d = 0; d < DK; d++) s += qs[q * DK + d] * own_key[d];
        float w = inv_norm * silu(s);
        for (int64_t d = 0; d < DV; d++) out[q * out_stride + d] = acc[q * DV + d] + w * own_value[d];
    }
}

/* one layer's bucket thresholds and bias tables, and its sliding window (window < 0: none) */
typedef struct {
    const float *position_bias, *time_bias;
    const int64_t *position_thresholds, *time_thresholds;
    int position_buckets, time_buckets, position_octave, time_octave;
    int64_t window, globals;
} Tables;

/* the first index in [j, end) whose value exceeds limit, in values non-decreasing on [j, end): a galloping search
 * from j (the answer is usually a few keys on, near the query, where buckets are narrow) */
static int64_t first_above(const int64_t *values, int64_t j, int64_t end, int64_t limit) {
    int64_t low = j, step = 1;
    while (low + step < end && values[low + step] <= limit) { low += step; step *= 2; }
    int64_t high = low + step < end ? low + step : end;  /* values[low] <= limit (or low == j); answer in (low, high] */
    if (values[low] > limit) return low;
    while (high - low > 1) {
        int64_t middle = low + (high - low) / 2;
        if (values[middle] <= limit) low = middle; else high = middle;
    }
    return high;
}

/* the starts of the runs of keys whose positions and times are both non-decreasing: starts[0] = 0, then each j with
 * kp[j] < kp[j - 1] or kt[j] < kt[j - 1], then S; returns the number of runs */
static int64_t monotone_runs(int64_t S, const int64_t *kp, const int64_t *kt, int64_t *starts) {
    int64_t runs = 0;
    starts[runs++] = 0;
    for (int64_t j = 1; j < S; j++)
        if (kp[j] < kp[j - 1] || kt[j] < kt[j - 1]) starts[runs++] = j;
    starts[runs] = S;
    return runs - (S == 0);
}

/* a key seen by a query: its bias, and its weight multiplier (inv_norm, times key_scale on cached keys) */
static inline void one_key(int64_t j, int64_t qp, int64_t qt, const int64_t *kp, const int64_t *kt,
                           const uint8_t *kv, const Tables *t, float weight_cached, float weight_new, int64_t n,
                           float *bias, float *mask, int32_t *buckets) {
    if (!(kv[j] && kp[j] < qp)) {
        bias[j] = 0.0f; mask[j] = 0.0f;
        if (buckets) buckets[2 * j] = buckets[2 * j + 1] = 0;
        return;
    }
    int pb = bucket_of(distance(qp, kp[j]), t->position_thresholds, t->position_buckets, t->position_octave);
    int tb = bucket_of(distance(qt, kt[j]), t->time_thresholds, t->time_buckets, t->time_octave);
    bias[j] = t->position_bias[pb] + t->time_bias[tb];
    mask[j] = j < n ? weight_cached : weight_new;
    if (buckets) { buckets[2 * j] = pb; buckets[2 * j + 1] = tb; }
}

/* The bias and mask rows of query (qp, qt) over S keys (the diagonal excluded: the caller adds it), and the first
 * and last key it sees (first = S when none). Within a monotone run, the keys before the query (kp < qp, kt <= qt)
 * are a prefix whose distances shrink along the run, so both buckets are step functions of j: each step is
 * bucketed once and its end found by a search on positions and times. The rest of a run is done key by key.
 * Then the keys outside a sliding window (t->window >= 0) are unseen.
 * buckets: where each key's (position, time) buckets go (2 S entries; 0 for unseen keys), or NULL. */
static void fill_row(int64_t S, int64_t n, const int64_t *kp, const int64_t *kt, const uint8_t *kv,
                     const int64_t *starts, int64_t runs, int64_t qp, int64_t qt, const Tables *t,
                     float weight_cached, float weight_new, float *bias, float *mask, int32_t *buckets,
                     int64_t *first, int64_t *last) {
    for (int64_t r = 0; r < runs; r++) {
        int64_t low = starts[r], high = starts[r + 1];
        int64_t end = first_above(kp, low, high, qp - 1);  /* kp < qp before end */
        int64_t end_time = first_above(kt, low, end, qt);   /* and kt <= qt */
        end = end_time < end ? end_time : end;
        for (int64_t j = low; j < end;) {
            int pb = bucket_of(qp - kp[j], t->position_thresholds, t->position_buckets, t->position_octave);
            int tb = bucket_of(qt - kt[j], t->time_thresholds, t->time_buckets, t->time_octave);
            /* the buckets hold while qp - kp >= threshold and qt - kt >= threshold */
            int64_t stop = first_above(kp, j, end, qp - t->position_thresholds[pb]);
            int64_t stop_time = first_above(kt, j, stop, qt - t->time_thresholds[tb]);
            stop = stop_time < stop ? stop_time : stop;
            float value = t->position_bias[pb] + t->time_bias[tb];
            for (int64_t k = j; k < stop; k++) bias[k] = value;
            if (buckets)
                for (int64_t k = j; k < stop; k++) { buckets[2 * k] = pb; buckets[2 * k + 1] = tb; }
            j = stop;
        }
        for (int64_t k = low; k < end; k++) mask[k] = kv[k] ? (k < n ? weight_cached : weight_new) : 0.0f;
        for (int64_t k = end; k < high; k++)
            one_key(k, qp, qt, kp, kt, kv, t, weight_cached, weight_new, n, bias, mask, buckets);
    }
    if (t->window >= 0)  /* outside the sliding window: as a key not seen */
        for (int64_t k = 0; k < S; k++)
            if (kp[k] < qp - t->window && kp[k] >= t->globals) {
                bias[k] = 0.0f; mask[k] = 0.0f;
                if (buckets) buckets[2 * k] = buckets[2 * k + 1] = 0;
            }
    int64_t j = 0;
    while (j < S && mask[j] == 0.0f) j++;
    *first = j;
    j = S - 1;
    while (j >= 0 && mask[j] == 0.0f) j--;
    *last = j;
}

/* The outputs of the (b, i) rows in [row_begin, row_end) (arguments as in the header; B is 1 where the keys are
 * read in place, head kh's stored keys and values start at kh * cached_key_head and kh * cached_value_head, and the
 * row holds `stored` of the n stored keys: the rest is padding, never read). Returns 0, or -1 when its buffers
 * could not be allocated (then those rows of out are not written). */
static int hstu_attention_rows(
    SIZE_PARAMS,
    const float *q, const float *keys_t, const float *values, const float *cached_keys, const float *cached_values,
    int64_t cached_key_head, int64_t cached_value_head, int64_t stored, const float *new_keys,
    const float *new_values,
    META_PARAMS,
    TABLE_PARAMS,
    float alpha, float inv_norm, float *out, int64_t row_begin, int64_t row_end)
{
    (void)B;
    /* QUERY_TILE slots, each the bias and mask rows of each metadata head for one query, kept while the slot's next
     * query shares its (b, position, time) */
    size_t rows = (size_t)(QUERY_TILE * Hm * S > 0 ? QUERY_TILE * Hm * S : 1);
    float *bias = malloc(sizeof(float) * rows), *mask = malloc(sizeof(float) * rows);
    int64_t *firsts = malloc(sizeof(int64_t) * (size_t)(QUERY_TILE * Hm));
    int64_t *lasts = malloc(sizeof(int64_t) * (size_t)(QUERY_TILE * Hm));
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(Hm * (S + 1))), *runs = malloc(sizeof(int64_t) * (size_t)Hm);
    float *scores = malloc(sizeof(float) * QUERY_TILE * KEY_BLOCK);
    if (!bias || !mask || !firsts || !lasts || !starts || !runs || !scores) {
        free(bias); free(mask); free(firsts); free(lasts); free(starts); free(runs); free(scores);
        return -1;
    }
    Tables tables = {position_bias, time_bias, position_thresholds, time_thresholds, (int)position_buckets,
                     (int)time_buckets, (int)position_octave, (int)time_octave, window, globals};
    int64_t heads_per_meta = H / Hm, heads_per_key = H / Hk;
    int64_t slot_b[QUERY_TILE], slot_pos[QUERY_TILE], slot_time[QUERY_TILE], runs_b = -1;  /* what they hold */
    for (int t = 0; t < QUERY_TILE; t++) slot_b[t] = -1, slot_pos[t] = slot_time[t] = 0;
    float self_bias = position_bias[0] + time_bias[0];  /* distance 0 in position and time */

    for (int64_t row = row_begin, tile; row < row_end; row += tile) {
        int64_t b = row / T, i = row % T;
        /* the queries i to i + QUERY_TILE - 1 of a batch row at once, for i a multiple of QUERY_TILE (over the
         * transposed keys whole tiles only; in place, the last tile of a row shorter), so that which queries share a
         * tile (and the order of each one's sums) does not depend on the row range (the exported forward splits
         * the rows at tile boundaries) */
        if (i % QUERY_TILE != 0)
            tile = 1;
        else if (keys_t != NULL)
            tile = i + QUERY_TILE <= T && row + QUERY_TILE <= row_end ? QUERY_TILE : 1;
        else  /* the rest of the row or of the range, at most QUERY_TILE */
            tile = T - i < row_end - row ? T - i : row_end - row, tile = tile < QUERY_TILE ? tile : QUERY_TILE;
        if (b != runs_b) {
            runs_b = b;
            for (int64_t m = 0; m < Hm; m++)
                runs[m] = monotone_runs(S, key_pos + (b * Hm + m) * S, key_time + (b * Hm + m) * S,
                                        starts + m * (S + 1));
        }
        for (int t = 0; t < tile; t++) {
            int64_t qp = query_pos[b * T + i + t], qt = query_time[b * T + i + t];
            if (b == slot_b[t] && qp == slot_pos[t] && qt == slot_time[t]) continue;
            slot_b[t] = b; slot_pos[t] = qp; slot_time[t] = qt;
            float weight_cached = inv_norm * (key_scale != NULL ? key_scale[b] : 1.0f);
            for (int64_t m = 0; m < Hm; m++) {
                int64_t at = t * Hm + m;
                fill_row(S, n, key_pos + (b * Hm + m) * S, key_time + (b * Hm + m) * S, key_valid + (b * Hm + m) * S,
                         starts + m * (S + 1), runs[m], qp, qt, &tables, weight_cached, inv_norm, bias + at * S,
                         mask + at * S, NULL, firsts + at, lasts + at);
            }
        }
        for (int64_t h = 0; h < H; h++) {
            int64_t m = h / heads_per_meta, kh = h / heads_per_key;
            const float *q0 = q + ((b * H + h) * T + i) * dk, *bm = bias + m * S, *mm = mask + m * S;
            float *o = out + ((b * T + i) * H + h) * dv;
            int64_t first = S, last = -1, stride = Hm * S;  /* slot t's rows of head m are at m * S + t * stride */
            for (int t = 0; t < tile; t++) {
                first = firsts[t * Hm + m] < first ? firsts[t * Hm + m] : first;
                last = lasts[t * Hm + m] > last ? lasts[t * Hm + m] : last;
            }
            if (keys_t == NULL) {  /* the keys where the model holds them */
                const float *ck = cached_keys + kh * cached_key_head, *cv = cached_values + kh * cached_value_head;
                const float *nk = new_keys + (b * Hk + kh) * T * dk, *nv = new_values + (b * Hk + kh) * T * dv;
                if (dk == 16 && dv == 16)
                    head_rows_direct(16, 16, tile, n, stored, first, last, q0, alpha, ck, cv, nk, nv, bm, mm, stride,
                                     i, self_bias, inv_norm, scores, o, H * dv);
                else
                    head_rows_direct(dk, dv, tile, n, stored, first, last, q0, alpha, ck, cv, nk, nv, bm, mm, stride,
                                     i, self_bias, inv_norm, scores, o, H * dv);
                continue;
            }
            const float *kt_head = keys_t + (b * Hk + kh) * dk * S, *v_head = values + (b * Hk + kh) * S * dv;
            if (tile == QUERY_TILE && dk == 16 && dv == 16)
                head_rows(QUERY_TILE, 16, 16, S, first, last, q0, alpha, kt_head, v_head, bm, mm, stride, n + i,
                          self_bias, inv_norm, scores, o, H * dv);
            else if (tile == QUERY_TILE)
                head_rows(QUERY_TILE, dk, dv, S, first, last, q0, alpha, kt_head, v_head, bm, mm, stride, n + i,
                          self_bias, inv_norm, scores, o, H * dv);
            else if (dk == 16 && dv == 16)
                head_rows(1, 16, 16, S, first, last, q0, alpha, kt_head, v_head, bm, mm, stride, n + i, self_bias,
                          inv_norm, scores, o, H * dv);
            else
                head_rows(1, dk, dv, S, first, last, q0, alpha, kt_head, v_head, bm, mm, stride, n + i, self_bias,
                          inv_norm, scores, o, H * dv);
        }
    }
    free(bias); free(mask); free(firsts); free(lasts); free(starts); free(runs); free(scores);
    return 0;
}

/* rows[j * D + d] += sum_q coefficients[q * KEY_BLOCK + j] * vectors[q * D + d] for j < width, over NQ queries:
 * the vectors held in registers when D is a multiple of VLEN (one pass of loads and stores over the rows, each
 * row's NQ updates summed before its store) */
static inline __attribute__((always_inline)) void outer_update(
    const int NQ, const int64_t D, int64_t width, const float *coefficients, const float *vectors, float *rows)
{
    if (D % VLEN == 0) {
        const int64_t C = D / VLEN > 0 ? D / VLEN : 1;
        vf held[NQ * C];
        for (int q = 0; q < NQ; q++)
            for (int64_t c = 0; c < D / VLEN; c++) held[q * C + c] = loadv(vectors + q * D + VLEN * c);
        for (int64_t j = 0; j < width; j++)
            for (int64_t c = 0; c < D / VLEN; c++) {
                vf row = loadv(rows + j * D + VLEN * c);
                for (int q = 0; q < NQ; q++) row += ((vf){0} + coefficients[q * KEY_BLOCK + j]) * held[q * C + c];
                storev(rows + j * D + VLEN * c, row);
            }
        return;
    }
    for (int64_t j = 0; j < width; j++)
        for (int q = 0; q < NQ; q++)
            for (int64_t d = 0; d < D; d++) rows[j * D + d] += coefficients[q * KEY_BLOCK + j] * vectors[q * D + d];
}

/* The gradients of NQ query rows of one head (head_rows' inputs, plus dout_q, the gradient of query q's output):
 *     w_j = mask_j SiLU(s_j), s_j = qs . k_j + bias_j,  out_i = sum_j w_j v_j (+ the diagonal, mask inv_norm)
 *     dv_j += w_j dout_i;  ds_j = (dout_i . v_j) mask_j SiLU'(s_j);  dk_j += ds_j qs;  dq_i = alpha sum_j ds_j k_j
 * for each query, and ds_j is added to its dsum row (the bias gradient of the row, summed over the heads that
 * share it). Query q's dout is dout0 + q * dout_stride, its dq dq0 + q * DK, its bias, mask and dsum rows at
 * q * row_stride, its own key self + q. Returns the sum of the diagonals' ds (the gradient of the distance-0
 * bias). dk and dv are (S, DK) and (S, DV), accumulated; weights and dscores hold NQ * KEY_BLOCK floats. */
static inline __attribute__((always_inline)) double head_rows_backward(
    const int NQ, const int64_t DK, const int64_t DV, int64_t S, int64_t first, int64_t last, const float *q0,
    float alpha, const float *keys_t, const float *keys, const float *values_t, const float *values,
    const float *bias, const float *mask, int64_t row_stride, int64_t self, float self_bias, float inv_norm,
    const float *dout0, int64_t dout_stride, float *weights, float *dscores, float *dsum, float *dq0, float *dk,
    float *dv)
{
    float qs[NQ * DK], acc[NQ * DK], douts[NQ * DV];
    for (int64_t d = 0; d < NQ * DK; d++) { qs[d] = alpha * q0[d]; acc[d] = 0.0f; }
    for (int q = 0; q < NQ; q++)
        for (int64_t d = 0; d < DV; d++) douts[q * DV + d] = dout0[q * dout_stride + d];
    for (int64_t start = first; start <= last; start += KEY_BLOCK) {
        int64_t width = last + 1 - start < KEY_BLOCK ? last + 1 - start : KEY_BLOCK;
        if (block_unseen(NQ, width, mask + start, row_stride)) continue;
        block_scores(NQ, DK, S, width, qs, keys_t + start, bias + start, row_stride, weights);
        block_scores(NQ, DV, S, width, douts, values_t + start, NULL, 0, dscores);  /* dout . v_j */
        for (int q = 0; q < NQ; q++) {
            const float *mb = mask + q * row_stride + start;
            float *w = weights + q * KEY_BLOCK, *g = dscores + q * KEY_BLOCK, *ds = dsum + q * row_stride + start;
            for (int64_t j = 0; j < width; j++) {
                float x = w[j], sig = 1.0f / (1.0f + exp_clamped(-x));
                w[j] = mb[j] * x * sig;
                g[j] *= mb[j] * sig * (1.0f + x * (1.0f - sig));
            }
            for (int64_t j = 0; j < width; j++) ds[j] += g[j];
        }
        outer_update(NQ, DV, width, weights, douts, dv + start * DV);  /* dv_j += sum_q w_qj dout_q */
        outer_update(NQ, DK, width, dscores, qs, dk + start * DK);     /* dk_j += sum_q ds_qj qs_q */
        block_values(NQ, DK, width, dscores, keys + start * DK, acc);
    }
    double diagonal = 0.0;
    for (int q = 0; q < NQ; q++) {  /* the diagonal */
        const float *qq = qs + q * DK, *g = douts + q * DV;
        int64_t own = self + q;
        float x = self_bias, dw = 0.0f;
        for (int64_t d = 0; d < DK; d++) x += qq[d] * keys[own * DK + d];
        for (int64_t d = 0; d < DV; d++) dw += g[d] * values[own * DV + d];
        float sig = 1.0f / (1.0f + exp_clamped(-x)), w = inv_norm * x * sig;
        float ds = dw * inv_norm * sig * (1.0f + x * (1.0f - sig));
        for (int64_t d = 0; d < DV; d++) dv[own * DV + d] += w * g[d];
        for (int64_t d = 0; d < DK; d++) { dk[own * DK + d] += ds * qq[d]; acc[q * DK + d] += ds * keys[own * DK + d]; }
        for (int64_t d = 0; d < DK; d++) dq0[q * DK + d] = alpha * acc[q * DK + d];
        diagonal += ds;
    }
    return diagonal;
}

/* The gradients of hstu_attention_rows for the batch rows [batch_begin, batch_end), given dout (B, T, H, dv):
 * dq (B, H, T, dk) written; dk (B, Hk, S, dk) and dv (B, Hk, S, dv) accumulated (zero them first);
 * dposition (position_buckets) and dtime (time_buckets) accumulated in double. Other arguments as
 * hstu_attention_rows, plus keys (B, Hk, S, dk) and values_t (B, Hk, dv, S) in the other layout. Returns 0,
 * or -1 when its buffers could not be allocated. */
static int hstu_attention_backward_rows(
    SIZE_PARAMS,
    const float *q, const float *keys_t, const float *keys, const float *values_t, const float *values,
    META_PARAMS,
    TABLE_PARAMS,
    float alpha, float inv_norm, const float *dout, float *dq, float *dkeys, float *dvalues, double *dposition,
    double *dtime, int64_t batch_begin, int64_t batch_end)
{
    (void)B;
    /* QUERY_TILE slots of each metadata head's rows, as in the forward */
    size_t rows = (size_t)(QUERY_TILE * Hm * S > 0 ? QUERY_TILE * Hm * S : 1);
    float *bias = malloc(sizeof(float) * rows), *mask = malloc(sizeof(float) * rows);
    float *dsum = malloc(sizeof(float) * rows);
    int32_t *buckets = malloc(sizeof(int32_t) * 2 * rows);
    int64_t *firsts = malloc(sizeof(int64_t) * (size_t)(QUERY_TILE * Hm));
    int64_t *lasts = malloc(sizeof(int64_t) * (size_t)(QUERY_TILE * Hm));
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(Hm * (S + 1))), *runs = malloc(sizeof(int64_t) * (size_t)Hm);
    float *weights = malloc(sizeof(float) * QUERY_TILE * KEY_BLOCK);
    float *dscores = malloc(sizeof(float) * QUERY_TILE * KEY_BLOCK);
    if (!bias || !mask || !dsum || !buckets || !firsts || !lasts || !starts || !runs || !weights || !dscores) {
        free(bias); free(mask); free(dsum); free(buckets); free(firsts); free(lasts); free(starts); free(runs);
        free(weights); free(dscores);
        return -1;
    }
    Tables tables = {position_bias, time_bias, position_thresholds, time_thresholds, (int)position_buckets,
                     (int)time_buckets, (int)position_octave, (int)time_octave, window, globals};
    int64_t heads_per_meta = H / Hm, heads_per_key = H / Hk;
    float self_bias = position_bias[0] + time_bias[0];
    double self_grad = 0.0;
    for (int64_t b = batch_begin; b < batch_end; b++) {
        float weight_cached = inv_norm * (key_scale != NULL ? key_scale[b] : 1.0f);
        for (int64_t m = 0; m < Hm; m++)
            runs[m] = monotone_runs(S, key_pos + (b * Hm + m) * S, key_time + (b * Hm + m) * S, starts + m * (S + 1));
        for (int64_t i = 0, tile; i < T; i += tile) {
            /* queries i to i + QUERY_TILE - 1 at once, for i a multiple of QUERY_TILE, as in the forward */
            tile = i % QUERY_TILE == 0 && i + QUERY_TILE <= T ? QUERY_TILE : 1;
            for (int64_t t = 0; t < tile; t++) {
                int64_t qp = query_pos[b * T + i + t], qt = query_time[b * T + i + t];
                for (int64_t m = 0; m < Hm; m++) {
                    int64_t at = t * Hm + m;
                    fill_row(S, n, key_pos + (b * Hm + m) * S, key_time + (b * Hm + m) * S,
                             key_valid + (b * Hm + m) * S, starts + m * (S + 1), runs[m], qp, qt, &tables,
                             weight_cached, inv_norm, bias + at * S, mask + at * S, buckets + 2 * at * S, firsts + at,
                             lasts + at);
                }
            }
            for (int64_t m = 0; m < Hm; m++) {  /* each slot's dsum row, over the keys of any query of the tile */
                int64_t first = S, last = -1;
                for (int64_t t = 0; t < tile; t++) {
                    first = firsts[t * Hm + m] < first ? firsts[t * Hm + m] : first;
                    last = lasts[t * Hm + m] > last ? lasts[t * Hm + m] : last;
                }
                for (int64_t t = 0; t < tile; t++)
                    for (int64_t j = first; j <= last; j++) dsum[(t * Hm + m) * S + j] = 0.0f;
            }
            for (int64_t h = 0; h < H; h++) {
                int64_t m = h / heads_per_meta, kh = h / heads_per_key, head = b * Hk + kh, stride = Hm * S;
                const float *q0 = q + ((b * H + h) * T + i) * dk, *g0 = dout + ((b * T + i) * H + h) * dv;
                float *dq0 = dq + ((b * H + h) * T + i) * dk;
                const float *bm = bias + m * S, *mm = mask + m * S;
                const float *kt_head = keys_t + head * dk * S, *k_head = keys + head * S * dk;
                const float *vt_head = values_t + head * dv * S, *v_head = values + head * S * dv;
                float *dk_head = dkeys + head * S * dk, *dv_head = dvalues + head * S * dv, *ds = dsum + m * S;
                int64_t first = S, last = -1;
                for (int64_t t = 0; t < tile; t++) {
                    first = firsts[t * Hm + m] < first ? firsts[t * Hm + m] : first;
                    last = lasts[t * Hm + m] > last ? lasts[t * Hm + m] : last;
                }
                if (tile == QUERY_TILE && dk == 16 && dv == 16)
                    self_grad += head_rows_backward(QUERY_TILE, 16, 16, S, first, last, q0, alpha, kt_head, k_head,
                                                    vt_head, v_head, bm, mm, stride, n + i, self_bias, inv_norm, g0,
                                                    H * dv, weights, dscores, ds, dq0, dk_head, dv_head);
                else if (tile == QUERY_TILE)
                    self_grad += head_rows_backward(QUERY_TILE, dk, dv, S, first, last, q0, alpha, kt_head, k_head,
                                                    vt_head, v_head, bm, mm, stride, n + i, self_bias, inv_norm, g0,
                                                    H * dv, weights, dscores, ds, dq0, dk_head, dv_head);
                else if (dk == 16 && dv == 16)
                    self_grad += head_rows_backward(1, 16, 16, S, first, last, q0, alpha, kt_head, k_head, vt_head,
                                                    v_head, bm, mm, stride, n + i, self_bias, inv_norm, g0, H * dv,
                                                    weights, dscores, ds, dq0, dk_head, dv_head);
                else
                    self_grad += head_rows_backward(1, dk, dv, S, first, last, q0, alpha, kt_head, k_head, vt_head,
                                                    v_head, bm, mm, stride, n + i, self_bias, inv_norm, g0, H * dv,
                                                    weights, dscores, ds, dq0, dk_head, dv_head);
            }
            for (int64_t at = 0; at < tile * Hm; at++) {
                const int32_t *bk = buckets + 2 * at * S;
                for (int64_t j = firsts[at]; j <= lasts[at]; j++) {
                    dposition[bk[2 * j]] += dsum[at * S + j];
                    dtime[bk[2 * j + 1]] += dsum[at * S + j];
                }
            }
        }
    }
    dposition[0] += self_grad;  /* the diagonal's bias: distance 0, bucket 0 of both tables */
    dtime[0] += self_grad;
    free(bias); free(mask); free(dsum); free(buckets); free(firsts); free(lasts); free(starts); free(runs);
    free(weights); free(dscores);
    return 0;
}

/* this thread's place in its OpenMP team, and the team's size (0 of 1 without OpenMP, where the parallel pragmas
 * below are ignored) */
static inline int64_t team_member(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int64_t team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* One batch row's keys [cached (n); new (T)] laid out as hstu_attention_rows reads them (S = n + T): keys_t
 * (Hk, dk, S), values (Hk, S, dv), and positions, times and validity (Hm, S). */
typedef struct {
    float *keys_t, *values;
    int64_t *pos, *time;
    uint8_t *valid;
} RowKeys;

static void free_row_keys(RowKeys *r) { free(r->keys_t); free(r->values); free(r->pos); free(r->time); free(r->valid); }

static int alloc_row_keys(RowKeys *r, int64_t Hk, int64_t Hm, int64_t S, int64_t dk, int64_t dv, int with_keys) {
    size_t keys = (size_t)(Hk * S > 0 && with_keys ? Hk * S : 1), meta = (size_t)(Hm * S > 0 ? Hm * S : 1);
    r->keys_t = malloc(sizeof(float) * keys * (size_t)(dk > 0 ? dk : 1));
    r->values = malloc(sizeof(float) * keys * (size_t)(dv > 0 ? dv : 1));
    r->pos = malloc(sizeof(int64_t) * meta);
    r->time = malloc(sizeof(int64_t) * meta);
    r->valid = malloc(meta);
    if (r->keys_t && r->values && r->pos && r->time && r->valid) return 0;
    free_row_keys(r);
    return -1;
}

/* Fill r with batch row b's keys: the cached ones (row: its entry of the forward's table of stored rows; the n -
 * stored past its own are zeros) transposed, then the new tokens' (T per head), whose position, time and validity
 * are the queries' own (query_pos, query_time, is_history); the keys and values only when with_keys (else the
 * metadata alone). The other pointers are those of the whole batch. */
static void gather_row_keys(int64_t b, int64_t Hk, int64_t Hm, int64_t T, int64_t n, int64_t dk, int64_t dv,
                            const int64_t *row,
                            const int64_t *cached_pos, const int64_t *cached_time, const uint8_t *cached_valid,
                            const float *new_keys, const float *new_values, const int64_t *query_pos,
                            const int64_t *query_time, const uint8_t *is_history, int with_keys, RowKeys *r) {
    int64_t S = n + T, stored = row[4];
    for (int64_t kh = 0; kh < Hk && with_keys; kh++) {
        const float *ck = stored_rows(row[0]) + kh * row[1], *nk = new_keys + (b * Hk + kh) * T * dk;
        float *kt = r->keys_t + kh * dk * S;
        for (int64_t j = 0; j < stored; j++)
            for (int64_t d = 0; d < dk; d++) kt[d * S + j] = ck[j * dk + d];
        for (int64_t j = stored; j < n; j++)
            for (int64_t d = 0; d < dk; d++) kt[d * S + j] = 0.0f;
        for (int64_t j = 0; j < T; j++)
            for (int64_t d = 0; d < dk; d++) kt[d * S + n + j] = nk[j * dk + d];
        float *v = r->values + kh * S * dv;
        if (stored > 0) memcpy(v, stored_rows(row[2]) + kh * row[3], sizeof(float) * (size_t)(stored * dv));
        for (int64_t x = stored * dv; x < n * dv; x++) v[x] = 0.0f;
        memcpy(v + n * dv, new_values + (b * Hk + kh) * T * dv, sizeof(float) * (size_t)(T * dv));
    }
    for (int64_t m = 0; m < Hm; m++) {
        if (n > 0) {  /* no stored keys: their pointers may be NULL, which memcpy may not be given */
            memcpy(r->pos + m * S, cached_pos + (b * Hm + m) * n, sizeof(int64_t) * (size_t)n);
            memcpy(r->time + m * S, cached_time + (b * Hm + m) * n, sizeof(int64_t) * (size_t)n);
            memcpy(r->valid + m * S, cached_valid + (b * Hm + m) * n, (size_t)n);
        }
        memcpy(r->pos + m * S + n, query_pos + b * T, sizeof(int64_t) * (size_t)T);
        memcpy(r->time + m * S + n, query_time + b * T, sizeof(int64_t) * (size_t)T);
        memcpy(r->valid + m * S + n, is_history + b * T, (size_t)T);
    }
}

/* The exported entry points: the rows (forward) or batch rows (backward) split into one contiguous range per
 * thread of an OpenMP team of `threads` (built with -fopenmp, this is the OpenMP runtime PyTorch already loaded,
 * so the kernel's threads are PyTorch's own and do not compete with them); without OpenMP, one range.
 *
 * The forward reads the stored keys and the new tokens' apart, as the model holds them (no joined, padded or
 * transposed copy made by the caller): rows (B, ROW_FIELDS) int64 gives batch row b's stored keys and values where
 * they are, each user's own tensors (a stored layer with spare rows, or one row of a padded batch): the address of
 * its keys and their head stride (in floats), the address of its values and their head stride, and how many keys
 * it holds (at most n; the rest of the n are padding, which cached_valid marks unseen and the kernel never reads);
 * each head's rows of dk (dv) floats are contiguous. cached_pos, cached_time (B, Hm, n) int64 and cached_valid
 * (B, Hm, n) uint8; new_keys (B, Hk, T, dk), new_values (B, Hk, T, dv), and the new keys' metadata is the
 * queries' (query_pos, query_time) with is_history (B, T) uint8 as their validity.
 * Each thread lays out the metadata of one batch row at a time (gather_row_keys), and its keys and values
 * transposed when the row has more than DIRECT_ROWS queries (else they are read in place), and computes that
 * row's queries of its range. The backward reads the joined layout of the header; its thread w accumulates its
 * bias gradients into dposition + w * position_buckets and dtime + w * time_buckets. Return 0, or -1 when some
 * thread could not allocate its buffers. */
int hstu_attention(
    int64_t B, int64_t H, int64_t Hk, int64_t Hm, int64_t T, int64_t n, int64_t dk, int64_t dv,
    const float *q, const int64_t *rows, const int64_t *cached_pos,
    const int64_t *cached_time, const uint8_t *cached_valid, const float *new_keys, const float *new_values,
    const int64_t *query_pos, const int64_t *query_time, const uint8_t *is_history, const float *key_scale,
    TABLE_PARAMS,
    float alpha, float inv_norm, float *out, int64_t threads)
{
    int failed = 0;
    int64_t S = n + T;
    if (B * T == 0) return 0;  /* no queries */
    (void)threads;  /* read by the pragma only */
    #pragma omp parallel num_threads(threads > 0 ? (int)threads : 1) reduction(| : failed)
    {
        /* whole tiles of QUERY_TILE queries per thread (hstu_attention_rows), the last of a batch row shorter */
        int64_t w = team_member(), count = team_size(), per_row = (T + QUERY_TILE - 1) / QUERY_TILE;
        int64_t tiles = B * per_row, first_tile = tiles * w / count, end_tile = tiles * (w + 1) / count;
        int64_t begin = first_tile / per_row * T + (first_tile % per_row) * QUERY_TILE;
        int64_t end = end_tile / per_row * T + (end_tile % per_row) * QUERY_TILE;
        RowKeys r;
        int transpose = T > DIRECT_ROWS;  /* few queries per batch row: read the keys in place */
        if (begin < end && alloc_row_keys(&r, Hk, Hm, S, dk, dv, transpose) != 0) {
            failed = 1;
        } else if (begin < end) {
            for (int64_t b = begin / T; b * T < end && !failed; b++) {
                int64_t first = begin > b * T ? begin - b * T : 0, last = end < (b + 1) * T ? end - b * T : T;
                const int64_t *row = rows + ROW_FIELDS * b;
                gather_row_keys(b, Hk, Hm, T, n, dk, dv, row, cached_pos, cached_time, cached_valid, new_keys,
                                new_values, query_pos, query_time, is_history, transpose, &r);
                failed |= hstu_attention_rows(
                    1, H, Hk, Hm, T, S, n, dk, dv, q + b * H * T * dk, transpose ? r.keys_t : NULL,
                    transpose ? r.values : NULL, stored_rows(row[0]), stored_rows(row[2]), row[1], row[3], row[4],
                    new_keys + b * Hk * T * dk, new_values + b * Hk * T * dv, query_pos + b * T,
                    query_time + b * T,
                    r.pos, r.time, r.valid, key_scale != NULL ? key_scale + b : NULL, TABLE_ARGS, alpha, inv_norm,
                    out + b * T * H * dv, first, last) != 0;
            }
            free_row_keys(&r);
        }
    }
    return failed ? -1 : 0;
}

int hstu_attention_backward(
    SIZE_PARAMS,
    const float *q, const float *keys_t, const float *keys, const float *values_t, const float *values,
    META_PARAMS,
    TABLE_PARAMS,
    float alpha, float inv_norm, const float *dout, float *dq, float *dkeys, float *dvalues, double *dposition,
    double *dtime, int64_t threads)
{
    int failed = 0;
    (void)threads;  /* read by the pragma only */
    #pragma omp parallel num_threads(threads > 0 ? (int)threads : 1) reduction(| : failed)
    {
        int64_t w = team_member(), count = team_size();
        failed |= hstu_attention_backward_rows(
            SIZE_ARGS, q, keys_t, keys, values_t, values, META_ARGS, TABLE_ARGS, alpha, inv_norm, dout, dq, dkeys,
            dvalues, dposition + w * position_buckets, dtime + w * time_buckets, B * w / count,
            B * (w + 1) / count) != 0;
    }
    return failed ? -1 : 0;
}
