/*
 * kvcake's CPU kernels: decode and prefill attention over the paged KV cache, and the fused
 * element-wise steps of a Llama layer (residual add + RMSNorm, rotary embedding,
 * SiLU-and-multiply).
 *
 * kvcake.engine.model.kernels compiles this file at first use with -DHEAD_DIM=, -DGROUPS= and
 * one of -DKV_BF16, -DKV_F16 or -DKV_F32 (compile-time sizes let the compiler unroll and
 * vectorise the inner loops), and calls the kvcake_* functions through ctypes.
 *
 * -- Decode attention, reading every block where it lies --------------------------------
 *
 * Each sequence b has one query token (heads = GROUPS * kv_heads query heads of HEAD_DIM)
 * that attends to its first lens[b] context tokens. Token t of sequence b sits in slot
 *
 *     tables[b * width + t / block_size] * block_size + t % block_size
 *
 * of the layer's K and V arrays, each (slots, kv_heads, HEAD_DIM). The GROUPS query heads
 * that share a K/V head are done together, so every K/V row is read once from memory, and
 * nothing is gathered into a padded copy first. Scores, softmax and the weighted sum run in
 * float32, the softmax online over chunks of CHUNK tokens (one rescale per chunk).
 *
 *     for each sequence b (and K/V head), for each chunk of tokens
 *         s[g][i] = scale * q[g] . K[slot(i)]          (GROUPS dot products per K row)
 *         m' = max(m, s);  acc *= exp(m - m');  p = exp(s - m')
 *         acc[g] += p[g][i] * V[slot(i)]               (one V row for GROUPS heads)
 *     out[g] = acc[g] / sum(p[g])
 *
 * -- Prefill attention ------------------------------------------------------------------------
 *
 * A prompt chunk's query row r (position first + r) is a decode over its first first + r + 1
 * tokens, chunk by chunk as a decode (its dot products add up in another order, so the last
 * bits may differ from a decode's). A row's result does not depend on the tile it is in or
 * on the threads. Up to QUERY_TILE rows of a chunk run
 * together: each chunk of K/V rows is widened to float once for all of them (K turned on its
 * side), so the scores run along the tokens and the weighted sums along the head, many
 * independent multiply-add chains at once. A chunk after a cached prefix reads the prefix
 * from its blocks in place, with no gather and no mask.
 *
 * -- Element-wise steps ---------------------------------------------------------------------
 *
 * Each rounds to the activation dtype where PyTorch's unfused ops do (every op's result is a
 * tensor of that dtype), so the fused step computes what the sequence of ops computed:
 *
 *     add_rms_norm:  x = x + delta;  out = weight * dtype(x * rsqrt(mean(x^2) + eps))
 *     rope:          q, k = x * cos + rotate_half(x) * sin      (HF's rotate-half layout)
 *     silu_mul:      out = dtype(silu(gate)) * up               (gate, up: halves of a row)
 *
 * -- Greedy sampling ------------------------------------------------------------------------
 *
 * Over float32 logits (rows, vocab), one pass for the peak, one for the normaliser:
 *
 *     ids[r] = first i with x[i] == max(x)              (torch.argmax's choice on ties)
 *     logprobs[r] = x[ids[r]] - logsumexp(x) = -log(sum(exp(max(x - max(x), -80))))
 *
 * exp of a logit far below the peak is a denormal float, which the CPU handles many times
 * slower; such terms add under 1e-30 of the sum, so they are raised to e^-80 (as the
 * sampler's own logsumexp does).
 *
 * Rows are shared among threads when there are enough of them to be worth a fork.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(HEAD_DIM) || !defined(GROUPS)
#error "compile with -DHEAD_DIM=<n> -DGROUPS=<n>"
#endif

#if defined(KV_BF16)
typedef uint16_t elem;
static inline float load(elem x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline elem store(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (elem)(bits >> 16);
}
#elif defined(KV_F16)
typedef _Float16 elem;
static inline float load(elem x) { return (float)x; }
static inline elem store(float f) { return (elem)f; }
#elif defined(KV_F32)
typedef float elem;
static inline float load(elem x) { return x; }
static inline elem store(float f) { return f; }
#else
#error "compile with one of -DKV_BF16, -DKV_F16, -DKV_F32"
#endif

#define CHUNK 64
#ifndef SEQUENCES_PER_THREAD
#define SEQUENCES_PER_THREAD 2  /* fewer sequences than this a thread: split by K/V head */
#endif

typedef struct {
    float q[GROUPS][HEAD_DIM];   /* the query heads, pre-scaled */
    float acc[GROUPS][HEAD_DIM]; /* running weighted sum of V rows */
    float max[GROUPS];           /* running max score */
    float sum[GROUPS];           /* running sum of exp(score - max) */
} state;

static void start(state *st, const elem *q, float scale) {
    for (int g = 0; g < GROUPS; g++) {
        for (int d = 0; d < HEAD_DIM; d++) {
            st->q[g][d] = load(q[g * HEAD_DIM + d]) * scale;
            st->acc[g][d] = 0.f;
        }
        st->max[g] = -FLT_MAX;
        st->sum[g] = 0.f;
    }
}

/* The GROUPS scores of each of count heads for each of the n tokens: a token's K row (its
 * heads side by side) is read once, front to back, for every head. */
static void scores(const state *st, int count, const elem *k, const int64_t *rows, int n,
                   float s[][GROUPS][CHUNK]) {
    for (int i = 0; i < n; i++) {
        const elem *row = k + rows[i];
        for (int h = 0; h < count; h++) {
            for (int g = 0; g < GROUPS; g++) {
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int d = 0; d < HEAD_DIM; d++)
                    dot += st[h].q[g][d] * load(row[h * HEAD_DIM + d]);
                s[h][g][i] = dot;
            }
        }
    }
}

static void rescale(state *st, int n, float s[GROUPS][CHUNK]) {
    for (int g = 0; g < GROUPS; g++) {
        float top = st->max[g];
        for (int i = 0; i < n; i++)
            top = s[g][i] > top ? s[g][i] : top;
        float shrink = expf(st->max[g] - top), total = 0.f;
        #pragma omp simd reduction(+:total)
        for (int i = 0; i < n; i++) {
            s[g][i] = expf(s[g][i] - top);
            total += s[g][i];
        }
        for (int d = 0; d < HEAD_DIM; d++)
            st->acc[g][d] *= shrink;
        st->sum[g] = st->sum[g] * shrink + total;
        st->max[g] = top;
    }
}

/* Each head's weighted sum of the n tokens' V rows, read once each, front to back. */
static void accumulate(state *st, int count, const elem *v, const int64_t *rows, int n,
                       float s[][GROUPS][CHUNK]) {
    float row[HEAD_DIM];
    for (int i = 0; i < n; i++) {
        const elem *vp = v + rows[i];
        for (int h = 0; h < count; h++) {
            #pragma omp simd
            for (int d = 0; d < HEAD_DIM; d++)
                row[d] = load(vp[h * HEAD_DIM + d]);
            for (int g = 0; g < GROUPS; g++) {
                float p = s[h][g][i];
                #pragma omp simd
                for (int d = 0; d < HEAD_DIM; d++)
                    st[h].acc[g][d] += p * row[d];
            }
        }
    }
}

static void token_rows(const int32_t *table, int t0, int n, int block_size, int64_t row,
                       int64_t rows[CHUNK]) {
    for (int i = 0; i < n; i++) {
        int t = t0 + i;
        rows[i] = ((int64_t)table[t / block_size] * block_size + t % block_size) * row;
    }
}

static void finish(const state *st, elem *out) {
    for (int g = 0; g < GROUPS; g++) {
        float inv = st->sum[g] > 0.f ? 1.f / st->sum[g] : 0.f;
        for (int d = 0; d < HEAD_DIM; d++)
            out[g * HEAD_DIM + d] = store(st->acc[g][d] * inv);
    }
}

static void prefetch_rows(const elem *k, const elem *v, const int64_t *rows, int n,
                          int64_t bytes) {
    for (int i = 0; i < n; i++) {
        const char *kp = (const char *)(k + rows[i]), *vp = (const char *)(v + rows[i]);
        for (int64_t at = 0; at < bytes; at += 64) {
            __builtin_prefetch(kp + at);
            __builtin_prefetch(vp + at);
        }
    }
}

/* K/V heads first .. last - 1 of one sequence, chunk by chunk: a chunk's rows (every head of
 * a token lies side by side) are read from memory once, in block order, each row front to
 * back for all its heads (head by head over the whole chunk took 1.3-1.5x as long, cache
 * cold); the next chunk's are asked for meanwhile. Each head does the same arithmetic, in
 * the same order, whatever range it is in. */
static void attend(const elem *q, const elem *k, const elem *v, const int32_t *table, int len,
                   elem *out, int kv_heads, int first, int last, int block_size, float scale) {
    const int count = last - first;
    const int64_t row = (int64_t)kv_heads * HEAD_DIM;
    const elem *kh = k + first * HEAD_DIM, *vh = v + first * HEAD_DIM;
    state st[count];
    float s[count][GROUPS][CHUNK];
    int64_t rows[CHUNK], ahead[CHUNK];
    for (int h = 0; h < count; h++)
        start(&st[h], q + h * GROUPS * HEAD_DIM, scale);
    token_rows(table, 0, len < CHUNK ? len : CHUNK, block_size, row, ahead);
    for (int t0 = 0; t0 < len; t0 += CHUNK) {
        int n = len - t0 < CHUNK ? len - t0 : CHUNK;
        memcpy(rows, ahead, sizeof rows);
        if (t0 + CHUNK < len) {
            int next = len - t0 - CHUNK < CHUNK ? len - t0 - CHUNK : CHUNK;
            token_rows(table, t0 + CHUNK, next, block_size, row, ahead);
            prefetch_rows(kh, vh, ahead, next, count * HEAD_DIM * (int64_t)sizeof(elem));
        }
        scores(st, count, kh, rows, n, s);
        for (int h = 0; h < count; h++)
            rescale(&st[h], n, s[h]);
        accumulate(st, count, vh, rows, n, s);
    }
    for (int h = 0; h < count; h++)
        finish(&st[h], out + h * GROUPS * HEAD_DIM);
}

/* q, out: (batch, kv_heads * GROUPS, HEAD_DIM); k, v: (slots, kv_heads, HEAD_DIM);
 * tables: (batch, width) block ids; lens: (batch,) context lengths, each >= 1. Threads take
 * whole sequences when there are enough of them, else (sequence, K/V head) pairs. */
void kvcake_paged_decode(const elem *q, const elem *k, const elem *v, const int32_t *tables,
                         const int32_t *lens, elem *out, int batch, int kv_heads, int width,
                         int block_size, float scale, int threads) {
    const int64_t heads = (int64_t)kv_heads * GROUPS;
    if (batch >= SEQUENCES_PER_THREAD * threads) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < batch; b++)
            attend(q + b * heads * HEAD_DIM, k, v, tables + (int64_t)b * width, lens[b],
                   out + b * heads * HEAD_DIM, kv_heads, 0, kv_heads, block_size, scale);
        return;
    }
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < kv_heads; h++) {
            int64_t at = ((int64_t)b * heads + (int64_t)h * GROUPS) * HEAD_DIM;
            attend(q + at, k, v, tables + (int64_t)b * width, lens[b], out + at, kv_heads, h,
                   h + 1, block_size, scale);
        }
    }
}

/* -- Prefill attention, reading every block where it lies -------------------------------- */

#ifndef QUERY_TILE
#define QUERY_TILE (GROUPS * HEAD_DIM <= 512 ? 16 : 4) /* query rows that share each K/V row read */
#endif

/* The chunk's K rows widened to float and turned on their side (a column a token), and its
 * V rows widened: every query row of the tile then runs along the tokens (scores) or along
 * the head (the weighted sum) with its sums in registers, with no horizontal additions. */
static void widen_chunk(const elem *k, const elem *v, const int64_t *rows, int n,
                        float keys[HEAD_DIM][CHUNK], float values[CHUNK][HEAD_DIM]) {
    for (int i = 0; i < n; i++) {
        const elem *kp = k + rows[i], *vp = v + rows[i];
        for (int d = 0; d < HEAD_DIM; d++)
            keys[d][i] = load(kp[d]);
        #pragma omp simd
        for (int d = 0; d < HEAD_DIM; d++)
            values[i][d] = load(vp[d]);
    }
    for (int d = 0; d < HEAD_DIM; d++)
        for (int i = n; i < CHUNK; i++)
            keys[d][i] = 0.f;  /* scores past n are computed (whole vectors) but never read */
}

/* Row r sees the first seen[r] of the chunk's tokens (rows further on see more). The GROUPS
 * heads' sums over the chunk are independent chains of multiply-adds, in registers. */
static void tile_scores(const state *st, int count, const int *seen,
                        const float keys[HEAD_DIM][CHUNK], float s[][GROUPS][CHUNK]) {
    for (int r = 0; r < count; r++) {
        if (seen[r] == 0)
            continue;
        float dots[GROUPS][CHUNK] = {{0.f}};
        for (int d = 0; d < HEAD_DIM; d++) {
            for (int g = 0; g < GROUPS; g++) {
                const float qd = st[r].q[g][d];
                #pragma omp simd
                for (int i = 0; i < CHUNK; i++)
                    dots[g][i] += qd * keys[d][i];
            }
        }
        memcpy(s[r], dots, sizeof dots);
    }
}

static void tile_accumulate(state *st, int count, const int *seen,
                            const float values[CHUNK][HEAD_DIM], float s[][GROUPS][CHUNK]) {
    for (int r = 0; r < count; r++) {
        float acc[GROUPS][HEAD_DIM];
        memcpy(acc, st[r].acc, sizeof acc);
        for (int i = 0; i < seen[r]; i++) {
            for (int g = 0; g < GROUPS; g++) {
                const float p = s[r][g][i];
                #pragma omp simd
                for (int d = 0; d < HEAD_DIM; d++)
                    acc[g][d] += p * values[i][d];
            }
        }
        memcpy(st[r].acc, acc, sizeof acc);
    }
}

/* count (<= QUERY_TILE) consecutive query rows of one sequence over one K/V head: row r sits at
 * position first + r and sees tokens 0 .. first + r, chunk by chunk as a decode does. */
static void attend_tile(const elem *q, const elem *k, const elem *v, const int32_t *table,
                        int first, int count, elem *out, int kv_heads, int head,
                        int block_size, float scale) {
    const int64_t row = (int64_t)kv_heads * HEAD_DIM, heads = (int64_t)kv_heads * GROUPS;
    const elem *kh = k + head * HEAD_DIM, *vh = v + head * HEAD_DIM;
    state st[QUERY_TILE];
    float s[QUERY_TILE][GROUPS][CHUNK], keys[HEAD_DIM][CHUNK], values[CHUNK][HEAD_DIM];
    int64_t rows[CHUNK];
    int seen[QUERY_TILE];
    for (int r = 0; r < count; r++)
        start(&st[r], q + (r * heads + head * GROUPS) * HEAD_DIM, scale);
    const int len = first + count;  /* the tile's last row sees every token */
    for (int t0 = 0; t0 < len; t0 += CHUNK) {
        int n = len - t0 < CHUNK ? len - t0 : CHUNK;
        for (int r = 0; r < count; r++) {
            int m = first + r + 1 - t0;
            seen[r] = m < 0 ? 0 : m < n ? m : n;
        }
        token_rows(table, t0, n, block_size, row, rows);
        widen_chunk(kh, vh, rows, n, keys, values);
        tile_scores(st, count, seen, keys, s);
        for (int r = 0; r < count; r++)
            if (seen[r] > 0)
                rescale(&st[r], seen[r], s[r]);
        tile_accumulate(st, count, seen, values, s);
    }
    for (int r = 0; r < count; r++)
        finish(&st[r], out + (r * heads + head * GROUPS) * HEAD_DIM);
}

/* Tiles of `size` rows the chunks make, counted into tiles[0 .. chunks]. */
static int count_tiles(const int32_t *lengths, int chunks, int size, int *tiles) {
    tiles[0] = 0;
    for (int c = 0; c < chunks; c++)
        tiles[c + 1] = tiles[c] + (lengths[c] + size - 1) / size;
    return tiles[chunks];
}

/* q, out: (tokens, kv_heads * GROUPS, HEAD_DIM): the query rows of `chunks` prefill chunks back
 * to back, chunk c's lengths[c] rows at positions firsts[c] onwards of the sequence whose block
 * ids are tables[c * width ..]; k, v as for decodes (each chunk's own K/V already written).
 * Threads take (tile of rows, K/V head) pairs, the costlier tiles (further on) first; tiles
 * shrink until every thread has a few (a short chunk after a long cached prefix). A row's
 * arithmetic is the same whatever tile it is in. */
void kvcake_paged_prefill(const elem *q, const elem *k, const elem *v, const int32_t *tables,
                          const int32_t *firsts, const int32_t *lengths, elem *out, int chunks,
                          int kv_heads, int width, int block_size, float scale, int threads) {
    int tiles[chunks + 1], rows[chunks + 1], size = QUERY_TILE;
    while (size > 1 && count_tiles(lengths, chunks, size, tiles) * kv_heads < 4 * threads)
        size /= 2;
    count_tiles(lengths, chunks, size, tiles);
    rows[0] = 0;
    for (int c = 0; c < chunks; c++)
        rows[c + 1] = rows[c] + lengths[c];
    const int64_t heads = (int64_t)kv_heads * GROUPS;
    const int items = tiles[chunks] * kv_heads;
    #pragma omp parallel for schedule(dynamic) num_threads(threads) if (items > 1)
    for (int item = 0; item < items; item++) {
        int tile = tiles[chunks] - 1 - item / kv_heads, head = item % kv_heads, c = 0;
        while (tiles[c + 1] <= tile)
            c++;
        int r0 = (tile - tiles[c]) * size;
        int count = lengths[c] - r0 < size ? lengths[c] - r0 : size;
        int64_t at = (int64_t)(rows[c] + r0) * heads * HEAD_DIM;
        attend_tile(q + at, k, v, tables + (int64_t)c * width, firsts[c] + r0, count, out + at,
                    kv_heads, head, block_size, scale);
    }
}

/* -- Element-wise steps ------------------------------------------------------------------ */

#define ROWS_PER_THREAD 8  /* fewer rows than this a thread run in the calling thread alone */

static inline float round_to_elem(float f) { return load(store(f)); }

/* x (rows, hidden) += delta (when given), then out = weight * norm(x); x and out may not
 * overlap. */
void kvcake_add_rms_norm(elem *x, const elem *delta, const elem *weight, elem *out, int rows,
                         int hidden, float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if (rows >= ROWS_PER_THREAD * threads)
    for (int r = 0; r < rows; r++) {
        elem *xr = x + (int64_t)r * hidden;
        elem *outr = out + (int64_t)r * hidden;
        float squares = 0.f;
        if (delta != NULL) {
            const elem *dr = delta + (int64_t)r * hidden;
            for (int i = 0; i < hidden; i++)
                xr[i] = store(load(xr[i]) + load(dr[i]));
        }
        #pragma omp simd reduction(+:squares)
        for (int i = 0; i < hidden; i++)
            squares += load(xr[i]) * load(xr[i]);
        float scale = 1.f / sqrtf(squares / (float)hidden + eps);
        for (int i = 0; i < hidden; i++)
            outr[i] = store(load(weight[i]) * round_to_elem(load(xr[i]) * scale));
    }
}

static void rotate(const elem *x, const elem *cos, const elem *sin, elem *out) {
    const int half = HEAD_DIM / 2;
    #pragma omp simd
    for (int d = 0; d < half; d++)
        out[d] = store(round_to_elem(load(x[d]) * load(cos[d]))
                       + round_to_elem(-load(x[d + half]) * load(sin[d])));
    #pragma omp simd
    for (int d = half; d < HEAD_DIM; d++)
        out[d] = store(round_to_elem(load(x[d]) * load(cos[d]))
                       + round_to_elem(load(x[d - half]) * load(sin[d])));
}

/* qkv (rows, row_stride): each row's first heads * HEAD_DIM values are q, the next
 * kv_heads * HEAD_DIM are k; cos, sin (rows, HEAD_DIM). Writes rotated q (rows, heads,
 * HEAD_DIM) and k (rows, kv_heads, HEAD_DIM), both contiguous. */
void kvcake_rope(const elem *qkv, int64_t row_stride, const elem *cos, const elem *sin,
                 elem *q, elem *k, int rows, int heads, int kv_heads, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if (rows >= ROWS_PER_THREAD * threads)
    for (int r = 0; r < rows; r++) {
        const elem *row = qkv + r * row_stride;
        const elem *c = cos + (int64_t)r * HEAD_DIM, *s = sin + (int64_t)r * HEAD_DIM;
        for (int h = 0; h < heads; h++)
            rotate(row + h * HEAD_DIM, c, s, q + ((int64_t)r * heads + h) * HEAD_DIM);
        for (int h = 0; h < kv_heads; h++)
            rotate(row + (heads + h) * HEAD_DIM, c, s,
                   k + ((int64_t)r * kv_heads + h) * HEAD_DIM);
    }
}

/* gate_up (rows, 2 * width): out (rows, width) = dtype(silu(gate)) * up. */
void kvcake_silu_mul(const elem *gate_up, elem *out, int rows, int width, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) \
        if (rows >= ROWS_PER_THREAD * threads)
    for (int r = 0; r < rows; r++) {
        const elem *gate = gate_up + (int64_t)r * 2 * width, *up = gate + width;
        elem *o = out + (int64_t)r * width;
        #pragma omp simd
        for (int i = 0; i < width; i++) {
            float g = load(gate[i]);
            o[i] = store(round_to_elem(g / (1.f + expf(-g))) * load(up[i]));
        }
    }
}

/* -- Greedy sampling ------------------------------------------------------------------------ */

#define LOWEST_EXPONENT -80.f

static void greedy_row(const float *x, int64_t vocab, int64_t *id, float *logprob) {
    float peak = x[0];
    #pragma omp simd reduction(max:peak)
    for (int64_t i = 1; i < vocab; i++)
        peak = fmaxf(peak, x[i]);
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < vocab; i++)
        sum += expf(fmaxf(x[i] - peak, LOWEST_EXPONENT));
    int64_t first = 0;
    while (first < vocab - 1 && x[first] != peak)
        first++;
    *id = first;
    *logprob = -logf(sum);
}

/* logits (rows, vocab) float32, vocab >= 1: each row's argmax and its log-probability. */
void kvcake_greedy(const float *logits, int rows, int64_t vocab, int64_t *ids, float *logprobs,
                   int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows >= threads)
    for (int r = 0; r < rows; r++)
        greedy_row(logits + (int64_t)r * vocab, vocab, ids + r, logprobs + r);
}
