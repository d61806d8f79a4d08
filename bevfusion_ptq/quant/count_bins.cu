// Histogram counting for calibration, compiled at run time with NVRTC (see histogram.py).
//
// state = [bin width w, bin count nb, running max of |x| / w, non-finite seen, blocks done],
// floats except the last, an unsigned counter that is zero between launches.
// grid  = counts, `capacity` bins. A value x goes to bin floor(|x| / w) (IEEE division, as
// torch divides); values at or past `capacity` are not counted (the caller sizes the buffer
// so that none are, and checks nb afterwards).
//
// Why shared memory: a block counts the lowest LOCAL_BINS bins in its own shared-memory
// histogram, where an atomic costs a few cycles, and adds it to `grid` once at the end.
// Activations put nearly all their mass in those bins; a value further out takes one global
// atomic. The zeros of a ReLU output all land in bin 0, so each thread counts its bin-0 values
// in a register and adds them to the block's histogram once at the end.
//
// Why no division per value: IEEE division is a dozen instructions, and the kernel is
// bound by its instructions, not by memory (dividing every value took 5.0 ms per R50 batch
// on an H200, the product 3.2 ms). A value's bin is floor(|x| * (1/w)) instead, which can
// differ from floor(|x| / w) only when the product lies within 2^-22 of an integer, relative
// to its size: the reciprocal and the product each round once, by at most 2^-24 relative,
// and |x| / w rounds once more. Such a value, a value at or past `capacity` and a non-finite
// one take the exact division, so every bin is the one IEEE division gives. The running max
// is kept in |x| and divided once per block: division by w > 0 is monotonic, so the max of
// the quotients is the quotient of the max. DIVIDE_EVERY_VALUE restores the first version's
// division of every value (bench/histogram_kernels.py compares the two).

#ifndef LOCAL_BINS
#define LOCAL_BINS 4096
#endif
// Copies of the shared-memory histogram; warp w counts into copy w % LOCAL_COPIES, so fewer
// warps collide on a popular bin. LOCAL_COPIES * LOCAL_BINS * 4 bytes must fit in 48 KiB.
// (Adding a warp's equal bins once with __match_any_sync instead was measured slower on an
// H200: 10.7 ms per R50 batch against 5.5 ms.)
#ifndef LOCAL_COPIES
#define LOCAL_COPIES 2
#endif
// 16-byte loads a thread issues before counting them (4: 2.8 ms per R50 batch, 1: 3.2 ms).
#ifndef LOADS_PER_STEP
#define LOADS_PER_STEP 4
#endif

// After a count: nb = max(nb, ceil(running max)), NaN once a non-finite value was seen, and a
// value lying exactly on the new top edge (bin nb) moves to bin nb - 1, as histc puts its
// upper edge in its last bin. Bins at or past nb held nothing before the count.
// Reads bypass L1 (__ldcg): the values come from other blocks' atomics.
__device__ void finish(float* grid, float* state, int capacity) {
    const float nb = __ldcg(state + 1);
    const float top = __ldcg(state + 2);
    const float bad = __ldcg(state + 3);
    float grown = fmaxf(nb, ceilf(top));
    if (nb != nb || bad > 0.0f) grown = __int_as_float(0x7fc00000);  // NaN, for good
    state[1] = grown;
    if (grown == grown) {
        const int edge = (int)grown;
        if (edge >= 1 && edge < capacity) {
            grid[edge - 1] = __ldcg(grid + edge - 1) + __ldcg(grid + edge);
            grid[edge] = 0.0f;
        }
    }
}

// Margin of the product path, relative to the product: twice the worst-case distance
// (3 roundings of 2^-24) between floor's argument here and IEEE division's quotient.
#define EDGE_MARGIN 4.76837158203125e-07f  // 2^-21

// Count one value: bin floor(|x| / w) into the block's histogram (bin 0 into `zeros`, bins
// past the shared-memory ones into `grid`), |x| into the running max when its quotient is
// finite, and `bad` when it is not.
__device__ __forceinline__ void count_value(float value, float width, float inverse, float limit,
                                            int local_bins, unsigned int* mine, float* grid,
                                            float& top, bool& bad, unsigned int& zeros) {
    const float a = fabsf(value);
    int bin;
#ifndef DIVIDE_EVERY_VALUE
    const float q = a * inverse;
    const float k = floorf(q);
    const float f = q - k;  // exact: k <= q < k + 1
    const float margin = q * EDGE_MARGIN;
    if (q < limit && f >= margin && f <= 1.0f - margin) {  // false for NaN and inf
        bin = (int)k;
    } else
#endif
    {
        const float t = __fdiv_rn(a, width);
        if (!(t - t == 0.0f)) {  // inf or NaN
            bad = true;
            return;
        }
        if (!(t < limit)) {  // past the buffer: not counted (the caller sized it), but in the max
            top = fmaxf(top, a);
            return;
        }
        bin = (int)t;
    }
    top = fmaxf(top, a);
    if (bin == 0) ++zeros;
    else if (bin < local_bins) atomicAdd(&mine[bin], 1u);
    else atomicAdd(&grid[bin], 1.0f);
}

// One launch per collect: the last block to finish (a ticket counter in state[4], the usual
// threadfence pattern) runs `finish`, when `last_piece` says that no launch follows for
// this tensor. One launch instead of two halves the host's launch work, which is what
// bounds a calibration batch once counting is fast.
extern "C" __global__ void count_bins(const float* __restrict__ x, int n, float* __restrict__ state,
                                      float* __restrict__ grid, int capacity, int last_piece) {
    __shared__ unsigned int local[LOCAL_COPIES * LOCAL_BINS];
    __shared__ float block_top[32];
    __shared__ unsigned int block_bad;
    __shared__ bool block_last;
    for (int i = threadIdx.x; i < LOCAL_COPIES * LOCAL_BINS; i += blockDim.x) local[i] = 0u;
    unsigned int* mine = local + ((threadIdx.x >> 5) % LOCAL_COPIES) * LOCAL_BINS;
    if (threadIdx.x == 0) block_bad = 0u;
    __syncthreads();

    const float width = state[0];
    const float inverse = __frcp_rn(width);
    const float limit = (float)capacity;
    const int local_bins = LOCAL_BINS < capacity ? LOCAL_BINS : capacity;
    const int lane = threadIdx.x & 31;
    float top = 0.0f;  // max |x| (not |x| / w) of the values with a finite quotient
    bool bad = false;
    unsigned int zeros = 0u;

    // LOADS_PER_STEP x four values per thread and step: 16-byte loads (the caller passes an
    // aligned x), all issued before any is counted, so more reads are in flight.
    const int n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += LOADS_PER_STEP * stride) {
        float4 v[LOADS_PER_STEP];
#pragma unroll
        for (int j = 0; j < LOADS_PER_STEP; ++j) {
            v[j] = i + j * stride < n4 ? x4[i + j * stride] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int j = 0; j < LOADS_PER_STEP; ++j) {
            if (i + j * stride < n4) {
                count_value(v[j].x, width, inverse, limit, local_bins, mine, grid, top, bad, zeros);
                count_value(v[j].y, width, inverse, limit, local_bins, mine, grid, top, bad, zeros);
                count_value(v[j].z, width, inverse, limit, local_bins, mine, grid, top, bad, zeros);
                count_value(v[j].w, width, inverse, limit, local_bins, mine, grid, top, bad, zeros);
            }
        }
    }
    // The last n % 4 values: block 0 only.
    if (blockIdx.x == 0 && threadIdx.x < (n & 3)) {
        count_value(x[(n & ~3) + threadIdx.x], width, inverse, limit, local_bins, mine, grid, top, bad, zeros);
    }
    // A warp's bin-0 count: one shared atomic.
    for (int offset = 16; offset > 0; offset >>= 1) zeros += __shfl_down_sync(0xffffffffu, zeros, offset);
    if (lane == 0 && zeros) atomicAdd(&mine[0], zeros);

    // Block max of |x|, then of |x| / w (one division), and the non-finite flag, then one
    // atomic each. The max is of non-negative floats, whose bit patterns order as integers.
    for (int offset = 16; offset > 0; offset >>= 1) top = fmaxf(top, __shfl_down_sync(0xffffffffu, top, offset));
    if (lane == 0) block_top[threadIdx.x >> 5] = top;
    if (bad) block_bad = 1u;
    __syncthreads();
    if (threadIdx.x < 32) {
        const int warps = blockDim.x >> 5;
        float m = threadIdx.x < warps ? block_top[threadIdx.x] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, offset));
        if (threadIdx.x == 0) {
            m = __fdiv_rn(m, width);
            block_top[0] = m;
            atomicMax(reinterpret_cast<int*>(state + 2), __float_as_int(m));
            if (block_bad) atomicMax(reinterpret_cast<int*>(state + 3), __float_as_int(1.0f));
        }
    }
    __syncthreads();
    // Add the block's counts to the buffer: only bins up to the block's largest value can
    // hold any, so a block of small values adds a few hundred bins, not LOCAL_BINS.
    const float block_max = block_top[0];
    const int used = block_max < (float)local_bins ? (int)block_max + 1 : local_bins;
    for (int i = threadIdx.x; i < used; i += blockDim.x) {
        unsigned int c = 0u;
#pragma unroll
        for (int copy = 0; copy < LOCAL_COPIES; ++copy) c += local[copy * LOCAL_BINS + i];
        if (c) atomicAdd(&grid[i], (float)c);
    }

    if (!last_piece) return;
    __threadfence();  // this block's counts and max are visible before its ticket
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* done = reinterpret_cast<unsigned int*>(state + 4);
        block_last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (block_last && threadIdx.x == 0) {
        __threadfence();
        finish(grid, state, capacity);
        *reinterpret_cast<unsigned int*>(state + 4) = 0u;
    }
}

// The first tensor of a histogram fixes its range: w = max|x| * inverse_bins, which is how
// torch computes a device tensor divided by a host number (times the reciprocal), and
// nb = max|x| / w, NaN when the max is zero or not finite, as those torch ops give it. The
// same launch zeroes the count buffer. One launch instead of four torch ops and a fill: a
// first batch of bevfusion-r50 starts 105 histograms, and the host's launch work is what
// bounds it.
// After fabsf every value, NaN included, has its sign bit clear, and such floats order as
// their bit patterns do as ints, with NaN above inf: so the integer max of the bits is max|x|,
// NaN whenever a NaN was seen, as torch's max gives it. Block b leaves its max in grid[b]
// (the buffer has far more than gridDim.x bins); the last block (ticket in state[4]) reduces
// those cells and then zeroes them.
extern "C" __global__ void first_range(const float* __restrict__ x, int n, float* __restrict__ state,
                                       float* __restrict__ grid, int capacity, float inverse_bins) {
    __shared__ int warp_top[32];
    __shared__ bool block_last;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = gridDim.x + first; i < capacity; i += stride) grid[i] = 0.0f;

    int top = 0;
    const int n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);  // the caller passes an aligned x
    for (long long i = first; i < n4; i += stride) {
        const float4 v = x4[i];
        top = max(top, max(max(__float_as_int(fabsf(v.x)), __float_as_int(fabsf(v.y))),
                           max(__float_as_int(fabsf(v.z)), __float_as_int(fabsf(v.w)))));
    }
    if (blockIdx.x == 0 && threadIdx.x < (n & 3)) top = max(top, __float_as_int(fabsf(x[(n & ~3) + threadIdx.x])));
    for (int offset = 16; offset > 0; offset >>= 1) top = max(top, __shfl_down_sync(0xffffffffu, top, offset));
    if ((threadIdx.x & 31) == 0) warp_top[threadIdx.x >> 5] = top;
    __syncthreads();
    if (threadIdx.x == 0) {
        int m = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = max(m, warp_top[w]);
        reinterpret_cast<int*>(grid)[blockIdx.x] = m;
        __threadfence();  // the block's max is visible before its ticket
        block_last = atomicAdd(reinterpret_cast<unsigned int*>(state + 4), 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (block_last && threadIdx.x == 0) {
        __threadfence();
        int m = 0;
        for (unsigned int b = 0; b < gridDim.x; ++b) m = max(m, __ldcg(reinterpret_cast<const int*>(grid) + b));
        for (unsigned int b = 0; b < gridDim.x; ++b) grid[b] = 0.0f;
        const float top_value = __int_as_float(m);
        const float width = __fmul_rn(top_value, inverse_bins);
        state[0] = width;
        state[1] = __fdiv_rn(top_value, width);
        state[2] = 0.0f;
        state[3] = 0.0f;
        *reinterpret_cast<unsigned int*>(state + 4) = 0u;
    }
}
