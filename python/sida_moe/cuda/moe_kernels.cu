// Gathered expert kernels of sida-moe: one MoE layer computed straight out of the cache slots.
//
// Compiled at run time by NVRTC (sida_moe/kernels/cuda_build.py), one module per expert shape class,
// with these defines:
//   SIDA_DTYPE  0 = bf16, 1 = fp16 (weights, hidden states, output)
//   SIDA_H      hidden size; SIDA_I intermediate size (both multiples of 8)
//   SIDA_GATED  1: gate_up holds 2*I rows (gate rows, then up rows); 0: I rows (plain MLP)
//   SIDA_ACT    0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 gpt_oss clamped SwiGLU
//   SIDA_ALPHA, SIDA_LIMIT   gpt_oss constants (float literals)
// No headers are included: 16-bit float conversions are inline PTX, so NVRTC needs no include path.
//
// Data flow (see cuda_moe.py): moe_align sorts the (token, k) pairs by slot into blocks of BM rows
// (one slot per block, padded with the sentinel num_pairs); then either
//   decode: gemv_gate_up_bmN -> fp32 activations -> gemv_down_bmN -> fp32 expert outputs, or
//   prefill: gather_rows -> grouped_mm -> act_rows -> grouped_mm (torch) -> expert outputs;
// and moe_reduce sums each token's k expert outputs, scaled by the routing weights, in a fixed order
// (deterministic: no atomics on the output) and writes or accumulates into the output.

typedef unsigned short u16;
typedef unsigned int u32;

#define SIDA_R (SIDA_GATED ? 2 * SIDA_I : SIDA_I)
#define WARPS 4  // warps per block of the GEMV kernels

// ------------------------------------------------------------------------------ 16-bit floats
__device__ __forceinline__ void unpack2(u32 w, float& lo, float& hi) {
#if SIDA_DTYPE == 0
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
#else
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(w));
#endif
}

__device__ __forceinline__ float to_f32(u16 v) {
#if SIDA_DTYPE == 0
    return __uint_as_float(((u32)v) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#endif
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if SIDA_DTYPE == 0
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// Weights are read once: bypass L1 so the activations (re-read by every warp) stay there.
__device__ __forceinline__ uint4 ld_stream(const u16* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// ------------------------------------------------------------------------------- activations
// Rounded to the storage dtype where the model's own (PyTorch) expert code rounds: the outputs of
// gate_up and down, and each elementwise op of the activation. Accumulation stays fp32; the point
// is an offloaded model that computes the function its original computes, op for op.
__device__ __forceinline__ float rnd(float x) {
    u16 h;
#if SIDA_DTYPE == 0
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
#endif
    return to_f32(h);
}

__device__ __forceinline__ float act_plain(float z) {  // z already rounded; result rounded
#if SIDA_ACT == 0
    return rnd(z / (1.0f + expf(-z)));
#elif SIDA_ACT == 1
    return rnd(0.5f * z * (1.0f + erff(z * 0.70710678118654752f)));
#elif SIDA_ACT == 2
    return rnd(0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z))));
#else
    return fmaxf(z, 0.0f);
#endif
}

// Gated: act_fn(gate) * up; GPT-OSS: clamp, gate * sigmoid(alpha * gate) * (up + 1). g, u rounded.
__device__ __forceinline__ float act_gated(float g, float u) {
#if SIDA_ACT == 4
    g = fminf(g, SIDA_LIMIT);
    u = fminf(fmaxf(u, -SIDA_LIMIT), SIDA_LIMIT);
    const float sig = rnd(1.0f / (1.0f + expf(-rnd(SIDA_ALPHA * g))));
    return rnd(rnd(u + 1.0f) * rnd(g * sig));
#else
    return rnd(act_plain(g) * u);
#endif
}

// ------------------------------------------------------------------------------------ align
// One block of 1024 threads. Counts the pairs per slot, pads each slot's run to a multiple of
// block_m, and writes:
//   sorted_ids[max_padded]   pair index (t * k + j) per sorted row; num_pairs in padding rows
//   block_slot[max_padded / block_m]  slot of each block of rows; -1 past the end
//   pair_pos[num_pairs]      sorted row of each pair; -1 when its expert has no slot
//   group_end[num_slots]     inclusive cumulative unpadded count per slot (grouped_mm offsets)
//   total_padded[1]          rows in use (multiple of block_m)
// Pairs whose expert id is out of [0, num_experts) or whose slot is -1 are skipped. Within a slot
// rows are in arrival order of an atomic counter: each row's result does not depend on its
// position, and moe_reduce sums a token's pairs in k order, so the output is deterministic.
// Shared memory: 2 * num_slots ints.
extern "C" __global__ void __launch_bounds__(1024) moe_align(
    const void* __restrict__ topk_ids, int ids_are_64bit, const int* __restrict__ slot_of_expert,
    int num_experts, int num_pairs, int num_slots, int block_m, int max_padded,
    int* __restrict__ sorted_ids, int* __restrict__ block_slot, int* __restrict__ pair_pos,
    int* __restrict__ group_end, int* __restrict__ total_padded) {
    extern __shared__ int smem[];
    int* count = smem;               // [num_slots]
    int* cursor = smem + num_slots;  // [num_slots] next free sorted row of each slot
    __shared__ int warp_sum[2][32];
    __shared__ int total_sh;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;

    for (int s = tid; s < num_slots; s += nthreads) count[s] = 0;
    for (int r = tid; r < max_padded; r += nthreads) sorted_ids[r] = num_pairs;
    __syncthreads();

    for (int p = tid; p < num_pairs; p += nthreads) {
        long long e = ids_are_64bit ? ((const long long*)topk_ids)[p] : (long long)((const int*)topk_ids)[p];
        int s = (e >= 0 && e < num_experts) ? slot_of_expert[e] : -1;
        if (s >= 0 && s < num_slots) atomicAdd(&count[s], 1);
    }
    __syncthreads();

    // Block-wide exclusive scan of the padded and unpadded counts; each thread owns a contiguous
    // run of slots.
    const int per = (num_slots + nthreads - 1) / nthreads;
    const int lo = min(tid * per, num_slots), hi = min(lo + per, num_slots);
    int local_pad = 0, local_raw = 0;
    for (int s = lo; s < hi; ++s) {
        local_pad += (count[s] + block_m - 1) / block_m * block_m;
        local_raw += count[s];
    }
    const int lane = tid & 31, warp = tid >> 5;
    int inc_pad = local_pad, inc_raw = local_raw;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        int a = __shfl_up_sync(0xffffffffu, inc_pad, off);
        int b = __shfl_up_sync(0xffffffffu, inc_raw, off);
        if (lane >= off) { inc_pad += a; inc_raw += b; }
    }
    if (lane == 31) { warp_sum[0][warp] = inc_pad; warp_sum[1][warp] = inc_raw; }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = nthreads >> 5;
        int a = lane < nwarps ? warp_sum[0][lane] : 0;
        int b = lane < nwarps ? warp_sum[1][lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            int a2 = __shfl_up_sync(0xffffffffu, a, off);
            int b2 = __shfl_up_sync(0xffffffffu, b, off);
            if (lane >= off) { a += a2; b += b2; }
        }
        if (lane < nwarps) { warp_sum[0][lane] = a; warp_sum[1][lane] = b; }
        if (lane == nwarps - 1) total_sh = a;
    }
    __syncthreads();
    int run_pad = inc_pad - local_pad + (warp > 0 ? warp_sum[0][warp - 1] : 0);
    int run_raw = inc_raw - local_raw + (warp > 0 ? warp_sum[1][warp - 1] : 0);
    for (int s = lo; s < hi; ++s) {
        const int c = count[s];
        const int padded = (c + block_m - 1) / block_m * block_m;
        cursor[s] = run_pad;
        for (int b = run_pad / block_m; b < (run_pad + padded) / block_m; ++b) block_slot[b] = s;
        run_pad += padded;
        run_raw += c;
        group_end[s] = run_raw;
    }
    const int total = total_sh;
    if (tid == 0) total_padded[0] = total;
    for (int b = total / block_m + tid; b < max_padded / block_m; b += nthreads) block_slot[b] = -1;
    __syncthreads();

    for (int p = tid; p < num_pairs; p += nthreads) {
        long long e = ids_are_64bit ? ((const long long*)topk_ids)[p] : (long long)((const int*)topk_ids)[p];
        int s = (e >= 0 && e < num_experts) ? slot_of_expert[e] : -1;
        int pos = -1;
        if (s >= 0 && s < num_slots) {
            pos = atomicAdd(&cursor[s], 1);
            sorted_ids[pos] = p;
        }
        pair_pos[p] = pos;
    }
}

// ------------------------------------------------------------------------- GEMV (decode) core
// One warp computes RPW weight rows (K elements each, K a compile-time constant) against up to BM
// activation rows: acc[r][m] = dot(w[r], a[m]). Weights are streamed in 16-byte vectors, CH vectors
// per lane and row loaded before any is used so that enough loads are in flight; activations are
// bf16/fp16 (hidden states) or fp32 (intermediate) and come from L1/L2.
template <int K, int RPW>
struct RowTiling {
    static constexpr int NV = K / 8;              // 16-byte vectors per row
    static constexpr int VPL = (NV + 31) / 32;    // vectors per lane
    static constexpr int CH_MAX = 8 / RPW > 0 ? 8 / RPW : 1;
    static constexpr int CH = VPL < CH_MAX ? VPL : CH_MAX;  // vectors per lane per chunk
};

__device__ __forceinline__ void load_act8(const u16* p, float (&x)[8]) {
    uint4 v = __ldg((const uint4*)p);
    unpack2(v.x, x[0], x[1]);
    unpack2(v.y, x[2], x[3]);
    unpack2(v.z, x[4], x[5]);
    unpack2(v.w, x[6], x[7]);
}

__device__ __forceinline__ void load_act8(const float* p, float (&x)[8]) {
    float4 a = __ldg((const float4*)p);
    float4 b = __ldg((const float4*)(p + 4));
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}

template <int K, int RPW, int BM, typename A>
__device__ __forceinline__ void warp_rows_dot(const u16* const (&wrow)[RPW], const A* const (&arow)[BM],
                                              int nvalid, float (&acc)[RPW][BM]) {
    typedef RowTiling<K, RPW> Tl;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int m = 0; m < BM; ++m) acc[r][m] = 0.0f;

#pragma unroll 1
    for (int c0 = 0; c0 < Tl::VPL; c0 += Tl::CH) {
        uint4 wv[RPW][Tl::CH];
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int c = 0; c < Tl::CH; ++c) {
                const int v = (c0 + c) * 32 + lane;
                wv[r][c] = (c0 + c < Tl::VPL && v < Tl::NV) ? ld_stream(wrow[r] + v * 8) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
        for (int m = 0; m < BM; ++m) {
            if (m < nvalid) {
#pragma unroll
                for (int c = 0; c < Tl::CH; ++c) {
                    const int v = (c0 + c) * 32 + lane;
                    if (c0 + c < Tl::VPL && v < Tl::NV) {
                        float x[8];
                        load_act8(arow[m] + v * 8, x);
#pragma unroll
                        for (int r = 0; r < RPW; ++r) {
                            float w0, w1, w2, w3, w4, w5, w6, w7;
                            unpack2(wv[r][c].x, w0, w1);
                            unpack2(wv[r][c].y, w2, w3);
                            unpack2(wv[r][c].z, w4, w5);
                            unpack2(wv[r][c].w, w6, w7);
                            float s = acc[r][m];
                            s = fmaf(w0, x[0], s); s = fmaf(w1, x[1], s);
                            s = fmaf(w2, x[2], s); s = fmaf(w3, x[3], s);
                            s = fmaf(w4, x[4], s); s = fmaf(w5, x[5], s);
                            s = fmaf(w6, x[6], s); s = fmaf(w7, x[7], s);
                            acc[r][m] = s;
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int m = 0; m < BM; ++m) {
            float s = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            acc[r][m] = s;
        }
}

// Leading rows of a block that hold real pairs (padding sits at the end of each slot's run).
template <int BM>
__device__ __forceinline__ int block_rows(const int* __restrict__ sorted_ids, int base, int num_pairs,
                                          int (&pair)[BM]) {
    int nvalid = 0;
#pragma unroll
    for (int m = 0; m < BM; ++m) {
        pair[m] = __ldg(sorted_ids + base + m);
        nvalid += pair[m] < num_pairs ? 1 : 0;
    }
    return nvalid;
}

// gate_up GEMV fused with the activation. grid = (max_blocks, ceil(I / (WARPS * JPW))): the blocks of
// one slot are launched next to each other, so an expert read by several blocks is re-read from L2.
// Each warp
// owns JPW output columns j of the intermediate: gated -> rows j and I + j; plain -> rows j, j+1.
// act_out: [max_padded, I] fp32, row = sorted row.
template <int BM>
__device__ __forceinline__ void gemv_gate_up_impl(
    const u16* __restrict__ hidden, const int* __restrict__ sorted_ids, const int* __restrict__ block_slot,
    const int* __restrict__ total_padded, const unsigned long long* __restrict__ expert_base, long long w_off,
    long long bias_off, float* __restrict__ act_out, int top_k,
    int num_pairs) {
    constexpr int JPW = SIDA_GATED ? 1 : 2;
    const int base = blockIdx.x * BM;
    if (base >= __ldg(total_padded)) return;
    const int slot = __ldg(block_slot + blockIdx.x);
    const int j0 = (blockIdx.y * WARPS + (threadIdx.x >> 5)) * JPW;
    if (j0 >= SIDA_I) return;  // whole warp; no block-level barrier follows

    int pair[BM];
    const int nvalid = block_rows<BM>(sorted_ids, base, num_pairs, pair);
    const u16* arow[BM];
#pragma unroll
    for (int m = 0; m < BM; ++m) arow[m] = hidden + (long long)(m < nvalid ? pair[m] / top_k : 0) * SIDA_H;

    // a coherent load: the cache flips entries between kernels (never within one)
    const unsigned long long eb = *reinterpret_cast<const volatile unsigned long long*>(expert_base + slot);
    const u16* ws = reinterpret_cast<const u16*>(eb + w_off);
    const u16* bias = bias_off >= 0 ? reinterpret_cast<const u16*>(eb + bias_off) : nullptr;
    const u16* wrow[2];
    wrow[0] = ws + (long long)j0 * SIDA_H;
    wrow[1] = SIDA_GATED ? ws + (long long)(SIDA_I + j0) * SIDA_H : ws + (long long)(j0 + 1) * SIDA_H;
    float acc[2][BM];
    warp_rows_dot<SIDA_H, 2, BM, u16>(wrow, arow, nvalid, acc);

    float b0 = 0.0f, b1 = 0.0f;
    if (bias != nullptr) {
        const u16* bs = bias;
        b0 = to_f32(bs[j0]);
        b1 = to_f32(bs[SIDA_GATED ? SIDA_I + j0 : j0 + 1]);
    }
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < BM; ++m) {
        if (m < nvalid && lane == (m & 31)) {
            float* dst = act_out + (long long)(base + m) * SIDA_I + j0;
#if SIDA_GATED
            dst[0] = act_gated(rnd(acc[0][m] + b0), rnd(acc[1][m] + b1));
#else
            dst[0] = act_plain(rnd(acc[0][m] + b0));
            dst[1] = act_plain(rnd(acc[1][m] + b1));
#endif
        }
    }
}

// down GEMV with the expert's bias. grid = (max_blocks, ceil(H / (WARPS * RPW_DOWN))).
// y: [max_padded, H] fp32 expert outputs (unweighted), row = sorted row.
#define DOWN_VPL ((SIDA_I / 8 + 31) / 32)
#define RPW_DOWN (DOWN_VPL <= 2 ? 4 : (DOWN_VPL <= 4 ? 2 : 1))

template <int BM>
__device__ __forceinline__ void gemv_down_impl(
    const float* __restrict__ act_in, const int* __restrict__ sorted_ids, const int* __restrict__ block_slot,
    const int* __restrict__ total_padded, const unsigned long long* __restrict__ expert_base, long long w_off,
    long long bias_off, float* __restrict__ y, int num_pairs) {
    const int base = blockIdx.x * BM;
    if (base >= __ldg(total_padded)) return;
    const int slot = __ldg(block_slot + blockIdx.x);
    const int h0 = (blockIdx.y * WARPS + (threadIdx.x >> 5)) * RPW_DOWN;
    if (h0 >= SIDA_H) return;

    int pair[BM];
    const int nvalid = block_rows<BM>(sorted_ids, base, num_pairs, pair);
    const float* arow[BM];
#pragma unroll
    for (int m = 0; m < BM; ++m) arow[m] = act_in + (long long)(base + (m < nvalid ? m : 0)) * SIDA_I;

    // a coherent load: the cache flips entries between kernels (never within one)
    const unsigned long long eb = *reinterpret_cast<const volatile unsigned long long*>(expert_base + slot);
    const u16* ws = reinterpret_cast<const u16*>(eb + w_off);
    const u16* bias = bias_off >= 0 ? reinterpret_cast<const u16*>(eb + bias_off) : nullptr;
    const u16* wrow[RPW_DOWN];
#pragma unroll
    for (int r = 0; r < RPW_DOWN; ++r) wrow[r] = ws + (long long)min(h0 + r, SIDA_H - 1) * SIDA_I;
    float acc[RPW_DOWN][BM];
    warp_rows_dot<SIDA_I, RPW_DOWN, BM, float>(wrow, arow, nvalid, acc);

    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < RPW_DOWN; ++r) {
        const int h = h0 + r;
        if (h >= SIDA_H) continue;
        const float b = bias != nullptr ? to_f32(bias[h]) : 0.0f;
#pragma unroll
        for (int m = 0; m < BM; ++m)
            if (m < nvalid && lane == ((m + r * BM) & 31)) y[(long long)(base + m) * SIDA_H + h] = rnd(acc[r][m] + b);
    }
}

#define SIDA_GEMV_KERNELS(BM)                                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_gate_up_bm##BM(                              \
        const u16* hidden, const int* sorted_ids, const int* block_slot, const int* total_padded,             \
        const unsigned long long* expert_base, long long w_off, long long bias_off, float* act_out,              \
        int top_k, int num_pairs) {                                                                            \
        gemv_gate_up_impl<BM>(hidden, sorted_ids, block_slot, total_padded, expert_base, w_off,           \
                              bias_off, act_out, top_k, num_pairs);                                     \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_down_bm##BM(                                 \
        const float* act_in, const int* sorted_ids, const int* block_slot, const int* total_padded,           \
        const unsigned long long* expert_base, long long w_off, long long bias_off, float* y,                          \
        int num_pairs) {                                                                                       \
        gemv_down_impl<BM>(act_in, sorted_ids, block_slot, total_padded, expert_base, w_off,              \
                           bias_off, y, num_pairs);                                                     \
    }

SIDA_GEMV_KERNELS(4)
SIDA_GEMV_KERNELS(8)
SIDA_GEMV_KERNELS(16)

// ------------------------------------------------------------- tensor-core GEMV (few tokens)
// A few tokens per expert: the weights are the M side of mma.sync.m16n8k16 (16 weight rows per
// tile), up to 8 tokens per n-tile ("swap AB"), fp32 accumulators. Each thread loads its A and B
// fragments straight from global memory with 16-byte loads: within a chunk of 32 columns, the
// thread with q = lane % 4 owns columns [8q, 8q + 8) of its rows; the first mma uses the first 4 of
// them as its k-slots {2q, 2q+1, 2q+8, 2q+9}, the second mma the last 4 (a dot product does not
// depend on the order of k, and A and B use the same mapping). A block's 4 warps split K (32 rows
// per block, so 4x the warps of one warp per tile), double-buffer their loads, and add their partial
// sums in shared memory. Needs K % 32 == 0.
#if SIDA_H % 32 == 0 && SIDA_I % 32 == 0
#define SIDA_HAS_MMA 1
#define MMA_U 2  // 32-column chunks per pipeline stage

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if SIDA_DTYPE == 0
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// 8 consecutive activations as 4 packed 16-bit pairs (the B fragments of two mmas).
__device__ __forceinline__ uint4 load_b8(const u16* p) { return __ldg((const uint4*)p); }
__device__ __forceinline__ uint4 load_b8(const float* p) {
    float4 a = __ldg((const float4*)p);
    float4 b = __ldg((const float4*)(p + 4));
    return make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
}

template <int MT, int NT>
struct MmaStage {
    uint4 alo[MMA_U][MT], ahi[MMA_U][MT], b[MMA_U][NT];
};

template <int K, int MT, int NT, typename A>
__device__ __forceinline__ void mma_load(MmaStage<MT, NT>& st, const u16* const (&wlo)[MT], const u16* const (&whi)[MT],
                                         const A* const (&brow)[NT], int c, int c_end, int q) {
#pragma unroll
    for (int u = 0; u < MMA_U; ++u) {
        if (c + u < c_end) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                st.alo[u][mt] = ld_stream(wlo[mt] + (c + u) * 32);
                st.ahi[u][mt] = ld_stream(whi[mt] + (c + u) * 32);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                st.b[u][nt] = brow[nt] != nullptr ? load_b8(brow[nt] + (c + u) * 32 + q * 8) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

template <int MT, int NT>
__device__ __forceinline__ void mma_compute(const MmaStage<MT, NT>& st, float (&acc)[MT][NT][4], int c, int c_end) {
#pragma unroll
    for (int u = 0; u < MMA_U; ++u) {
        if (c + u < c_end) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma16816(acc[mt][nt], st.alo[u][mt].x, st.ahi[u][mt].x, st.alo[u][mt].y, st.ahi[u][mt].y,
                             st.b[u][nt].x, st.b[u][nt].y);
                    mma16816(acc[mt][nt], st.alo[u][mt].z, st.ahi[u][mt].z, st.alo[u][mt].w, st.ahi[u][mt].w,
                             st.b[u][nt].z, st.b[u][nt].w);
                }
        }
    }
}

// This warp's share of K for 32 weight rows (MT = 2 tiles of 16) x 8*NT tokens, then the block's
// sum over its warps: on return, warp 0 holds the full sums in acc. wtile[mt]: row 0 of each
// 16-row tile (rows K apart); brow[nt]: this thread's token row (token nt * 8 + lane / 4), or
// nullptr for a padding token. Every warp of the block must call it (it has a barrier).
template <int K, int NT, typename A>
__device__ __forceinline__ void block_mma_rows(const u16* const (&wtile)[2], const A* const (&brow)[NT],
                                               float (&acc)[2][NT][4], float* red /* shared [WARPS-1][2*NT*4*32] */) {
    constexpr int MT = 2;
    constexpr int CHUNKS = K / 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int c_begin = warp * CHUNKS / WARPS, c_end = (warp + 1) * CHUNKS / WARPS;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    const u16* wlo[MT];
    const u16* whi[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        wlo[mt] = wtile[mt] + (long long)g * K + q * 8;
        whi[mt] = wtile[mt] + (long long)(g + 8) * K + q * 8;
    }
    MmaStage<MT, NT> s0, s1;  // double buffer: loads of the next stage fly during this one's mmas
    mma_load<K, MT, NT, A>(s0, wlo, whi, brow, c_begin, c_end, q);
#pragma unroll 1
    for (int c = c_begin; c < c_end; c += 2 * MMA_U) {
        mma_load<K, MT, NT, A>(s1, wlo, whi, brow, c + MMA_U, c_end, q);
        mma_compute<MT, NT>(s0, acc, c, c_end);
        mma_load<K, MT, NT, A>(s0, wlo, whi, brow, c + 2 * MMA_U, c_end, q);
        mma_compute<MT, NT>(s1, acc, c + MMA_U, c_end);
    }
    constexpr int PER_WARP = MT * NT * 4 * 32;
    if (warp > 0) {
        float* dst = red + (warp - 1) * PER_WARP;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) dst[((mt * NT + nt) * 4 + e) * 32 + lane] = acc[mt][nt][e];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int w = 1; w < WARPS; ++w)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] += red[(w - 1) * PER_WARP + ((mt * NT + nt) * 4 + e) * 32 + lane];
    }
}

// gate_up on tensor cores + activation. grid = (max_blocks, I / 16) gated or (max_blocks, I / 32)
// plain: a block owns gate rows [j0, j0+16) and the matching up rows, or rows [j0, j0+32).
// act_out as in gemv_gate_up.
template <int BM>
__device__ __forceinline__ void mma_gate_up_impl(
    const u16* __restrict__ hidden, const int* __restrict__ sorted_ids, const int* __restrict__ block_slot,
    const int* __restrict__ total_padded, const unsigned long long* __restrict__ expert_base, long long w_off,
    long long bias_off, float* __restrict__ act_out, int top_k,
    int num_pairs) {
    constexpr int NT = BM / 8;
    __shared__ float red[(WARPS - 1) * 2 * NT * 4 * 32];
    const int base = blockIdx.x * BM;
    if (base >= __ldg(total_padded)) return;  // whole block
    const int slot = __ldg(block_slot + blockIdx.x);
    const int j0 = blockIdx.y * (SIDA_GATED ? 16 : 32);
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;

    const u16* brow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int p = __ldg(sorted_ids + base + nt * 8 + g);
        brow[nt] = p < num_pairs ? hidden + (long long)(p / top_k) * SIDA_H : nullptr;
    }
    // a coherent load: the cache flips entries between kernels (never within one)
    const unsigned long long eb = *reinterpret_cast<const volatile unsigned long long*>(expert_base + slot);
    const u16* ws = reinterpret_cast<const u16*>(eb + w_off);
    const u16* bias = bias_off >= 0 ? reinterpret_cast<const u16*>(eb + bias_off) : nullptr;
    const u16* wtile[2];
    wtile[0] = ws + (long long)j0 * SIDA_H;
    wtile[1] = ws + (long long)(SIDA_GATED ? SIDA_I + j0 : j0 + 16) * SIDA_H;
    float acc[2][NT][4];
    block_mma_rows<SIDA_H, NT, u16>(wtile, brow, acc, red);
    if ((threadIdx.x >> 5) != 0) return;

    const u16* bs = bias;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // rows g and g + 8 of the tile
        const int j = j0 + g + half * 8;
        float b0 = 0.0f, b1 = 0.0f;
        if (bs != nullptr) {
            b0 = to_f32(bs[j]);
            b1 = to_f32(bs[SIDA_GATED ? SIDA_I + j : j + 16]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int m = nt * 8 + 2 * q + e;
                if (__ldg(sorted_ids + base + m) >= num_pairs) continue;
                float* dst = act_out + (long long)(base + m) * SIDA_I;
                const float z0 = rnd(acc[0][nt][half * 2 + e] + b0), z1 = rnd(acc[1][nt][half * 2 + e] + b1);
#if SIDA_GATED
                dst[j] = act_gated(z0, z1);
#else
                dst[j] = act_plain(z0);
                dst[j + 16] = act_plain(z1);
#endif
            }
    }
}

// down on tensor cores, + the expert's bias. grid = (max_blocks, H / 32); a block owns output rows
// [h0, h0 + 32). y as in gemv_down.
template <int BM>
__device__ __forceinline__ void mma_down_impl(
    const float* __restrict__ act_in, const int* __restrict__ sorted_ids, const int* __restrict__ block_slot,
    const int* __restrict__ total_padded, const unsigned long long* __restrict__ expert_base, long long w_off,
    long long bias_off, float* __restrict__ y, int num_pairs) {
    constexpr int NT = BM / 8;
    __shared__ float red[(WARPS - 1) * 2 * NT * 4 * 32];
    const int base = blockIdx.x * BM;
    if (base >= __ldg(total_padded)) return;
    const int slot = __ldg(block_slot + blockIdx.x);
    const int h0 = blockIdx.y * 32;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;

    const float* brow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int m = nt * 8 + g;
        brow[nt] = __ldg(sorted_ids + base + m) < num_pairs ? act_in + (long long)(base + m) * SIDA_I : nullptr;
    }
    // a coherent load: the cache flips entries between kernels (never within one)
    const unsigned long long eb = *reinterpret_cast<const volatile unsigned long long*>(expert_base + slot);
    const u16* ws = reinterpret_cast<const u16*>(eb + w_off);
    const u16* bias = bias_off >= 0 ? reinterpret_cast<const u16*>(eb + bias_off) : nullptr;
    const u16* wtile[2];
    wtile[0] = ws + (long long)h0 * SIDA_I;
    wtile[1] = ws + (long long)(h0 + 16) * SIDA_I;
    float acc[2][NT][4];
    block_mma_rows<SIDA_I, NT, float>(wtile, brow, acc, red);
    if ((threadIdx.x >> 5) != 0) return;

    const u16* bs = bias;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int h = h0 + mt * 16 + g + half * 8;
            const float b = bs != nullptr ? to_f32(bs[h]) : 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = nt * 8 + 2 * q + e;
                    if (__ldg(sorted_ids + base + m) >= num_pairs) continue;
                    y[(long long)(base + m) * SIDA_H + h] = rnd(acc[mt][nt][half * 2 + e] + b);
                }
        }
}

#define SIDA_MMA_KERNELS(BM)                                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) mma_gate_up_bm##BM(                               \
        const u16* hidden, const int* sorted_ids, const int* block_slot, const int* total_padded,             \
        const unsigned long long* expert_base, long long w_off, long long bias_off, float* act_out,              \
        int top_k, int num_pairs) {                                                                            \
        mma_gate_up_impl<BM>(hidden, sorted_ids, block_slot, total_padded, expert_base, w_off,            \
                             bias_off, act_out, top_k, num_pairs);                                      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) mma_down_bm##BM(                                  \
        const float* act_in, const int* sorted_ids, const int* block_slot, const int* total_padded,           \
        const unsigned long long* expert_base, long long w_off, long long bias_off, float* y,                          \
        int num_pairs) {                                                                                       \
        mma_down_impl<BM>(act_in, sorted_ids, block_slot, total_padded, expert_base, w_off,               \
                          bias_off, y, num_pairs);                                                      \
    }

SIDA_MMA_KERNELS(8)
SIDA_MMA_KERNELS(16)
SIDA_MMA_KERNELS(32)
#endif  // SIDA_H % 32 == 0 && SIDA_I % 32 == 0

// --------------------------------------------------------------------- prefill (grouped_mm) glue
// Rows sorted by slot (block_m = 1). gather_rows: xs[r] = hidden[sorted_ids[r] / top_k] for the
// rows in use. grid = (rows), block = 128; rows past total_padded stay unwritten: grouped_mm
// never reads rows past the last group offset.
extern "C" __global__ void __launch_bounds__(128) gather_rows(
    const u16* __restrict__ hidden, const int* __restrict__ sorted_ids, const int* __restrict__ total_padded,
    u16* __restrict__ xs, int top_k) {
    const int r = blockIdx.x;
    if (r >= __ldg(total_padded)) return;
    const int t = __ldg(sorted_ids + r) / top_k;
    const uint4* src = (const uint4*)(hidden + (long long)t * SIDA_H);
    uint4* dst = (uint4*)(xs + (long long)r * SIDA_H);
    for (int v = threadIdx.x; v < SIDA_H / 8; v += blockDim.x) dst[v] = __ldg(src + v);
}

// act_rows: a[r, :] = act(h[r, :] + bias[slot(r)]) in the storage dtype, 8 columns per thread.
// grid = (rows), block = 128.
extern "C" __global__ void __launch_bounds__(128) act_rows(
    const u16* __restrict__ h, const int* __restrict__ row_slot, const int* __restrict__ total_padded,
    const u16* __restrict__ bias, long long bias_slot_stride, u16* __restrict__ a) {
    const int r = blockIdx.x;
    if (r >= __ldg(total_padded)) return;
    const u16* hr = h + (long long)r * SIDA_R;
    const u16* br = bias != nullptr ? bias + (long long)__ldg(row_slot + r) * bias_slot_stride : nullptr;
    for (int v = threadIdx.x; v < SIDA_I / 8; v += blockDim.x) {
        float z[8], out[8];
        load_act8(hr + v * 8, z);
#if SIDA_GATED
        float u[8];
        load_act8(hr + SIDA_I + v * 8, u);
#endif
        if (br != nullptr) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                z[e] = rnd(z[e] + to_f32(br[v * 8 + e]));
#if SIDA_GATED
                u[e] = rnd(u[e] + to_f32(br[SIDA_I + v * 8 + e]));
#endif
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
#if SIDA_GATED
            out[e] = act_gated(z[e], u[e]);
#else
            out[e] = act_plain(z[e]);
#endif
        }
        uint4 o;
        o.x = pack2(out[0], out[1]);
        o.y = pack2(out[2], out[3]);
        o.z = pack2(out[4], out[5]);
        o.w = pack2(out[6], out[7]);
        *(uint4*)(a + (long long)r * SIDA_I + v * 8) = o;
    }
}

// ------------------------------------------------------------------------------------ reduce
// out[t, :] (+)= sum_j topk_weights[t, j] * (y[pair_pos[t*k+j], :] + down_bias[slot]) over the
// pairs that were computed, in j order. grid = (T, ceil(H / (8 * 128))), block = 128.
// y is fp32 (GEMV path, bias already added: row_slot = nullptr) or the storage dtype (grouped_mm
// path: the bias of the row's slot is added here).
template <typename Y>
__device__ __forceinline__ void moe_reduce_impl(
    const Y* __restrict__ y, const int* __restrict__ pair_pos, const float* __restrict__ topk_weights,
    const int* __restrict__ row_slot, const u16* __restrict__ bias, long long bias_slot_stride,
    u16* __restrict__ out, long long out_row_stride, int top_k, int accumulate) {
    const int t = blockIdx.x;
    const int h = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (h >= SIDA_H) return;
    float acc[8];
    u16* dst = out + (long long)t * out_row_stride + h;
    if (accumulate) {
        float x[8];
        load_act8((const u16*)dst, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = x[e];
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    }
    for (int j = 0; j < top_k; ++j) {
        const int pos = __ldg(pair_pos + t * top_k + j);
        if (pos < 0) continue;
        const float wt = __ldg(topk_weights + t * top_k + j);
        float v[8];
        load_act8(y + (long long)pos * SIDA_H + h, v);
        if (bias != nullptr) {
            float b[8];
            load_act8(bias + (long long)__ldg(row_slot + pos) * bias_slot_stride + h, b);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = rnd(v[e] + b[e]);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(wt, v[e], acc[e]);
    }
    uint4 o;
    o.x = pack2(acc[0], acc[1]);
    o.y = pack2(acc[2], acc[3]);
    o.z = pack2(acc[4], acc[5]);
    o.w = pack2(acc[6], acc[7]);
    *(uint4*)dst = o;
}

extern "C" __global__ void __launch_bounds__(128) moe_reduce_f32(
    const float* y, const int* pair_pos, const float* topk_weights, u16* out, long long out_row_stride,
    int top_k, int accumulate) {
    moe_reduce_impl<float>(y, pair_pos, topk_weights, nullptr, nullptr, 0, out, out_row_stride, top_k, accumulate);
}

extern "C" __global__ void __launch_bounds__(128) moe_reduce_half(
    const u16* y, const int* pair_pos, const float* topk_weights, const int* row_slot, const u16* bias,
    long long bias_slot_stride, u16* out, long long out_row_stride, int top_k, int accumulate) {
    moe_reduce_impl<u16>(y, pair_pos, topk_weights, row_slot, bias, bias_slot_stride, out, out_row_stride, top_k,
                         accumulate);
}
