// pskv-gpu CUDA kernels, compiled at run time by NVRTC (no CUDA headers
// needed). Every kernel gives the same bits as the CPU kernel of the same
// name (crate docs): same operations in the same order, IEEE round to
// nearest, no FMA contraction (there are no multiplications to fuse), no
// flush-to-zero. NaN payloads may differ (GPUs return a canonical NaN).
//
// Layout: 2-bit element k of a word sits at shift 8*(k/4) + 6 - 2*(k%4)
// (MXNet's byte masks 0xc0, 0x30, 0x0c, 0x03); 1-bit element k at
// 8*(k/8) + 7 - (k%8) (masks 0x80 >> k%8).
//
// Quantize kernels give one element to each thread; the threads of a warp
// hold 32 consecutive elements (block size a multiple of 32, grid-stride
// loops in steps of whole blocks), so a word is assembled with warp
// shuffles (2-bit) or a ballot (1-bit). Loops run to n rounded up to 32 so
// every lane takes part in the shuffles; lanes past n contribute zero.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(i, limit)                                              \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (limit);       \
         i += (u64)gridDim.x * blockDim.x)

// ---- f16 <-> f32, bit for bit as the `half` crate ----------------------

__device__ __forceinline__ float pskv_h2f(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = (u32)h & 0x7C00u;
    u32 man = (u32)h & 0x03FFu;
    u32 bits;
    if (((u32)h & 0x7FFFu) == 0u) {
        bits = sign;                                      // signed zero
    } else if (exp == 0x7C00u) {
        bits = man == 0u ? (sign | 0x7F800000u)           // infinity
                         : (sign | 0x7FC00000u | (man << 13));  // NaN, quieted
    } else if (exp == 0u) {
        // Subnormal: normalise.
        int e = __clz(man) - 16 - 6;                      // leading zeros in 16 bits, minus 6
        u32 fexp = (u32)(127 - 15 - e) << 23;
        u32 fman = (man << (14 + e)) & 0x7FFFFFu;
        bits = sign | fexp | fman;
    } else {
        bits = sign | (((exp >> 10) + 112u) << 23) | (man << 13);
    }
    return __uint_as_float(bits);
}

__device__ __forceinline__ u16 pskv_f2h(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0u ? 0u : 0x0200u;
        return (u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) {
        return (u16)(half_sign | 0x7C00u);
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return (u16)half_sign;
        }
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man += 1u;
        }
        return (u16)(half_sign | half_man);
    }
    u32 hexp = (u32)half_exp << 10;
    u32 half_man = man >> 13;
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return (u16)((half_sign | hexp | half_man) + 1u);
    }
    return (u16)(half_sign | hexp | half_man);
}

// ---- sum of N inputs, left to right -------------------------------------
// `ins` is a device array of `nin` device pointers.

extern "C" __global__ void pskv_sum_f32(float* out, const u64* ins, u32 nin, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float acc = ((const float*)ins[0])[i];
        for (u32 k = 1; k < nin; ++k) {
            acc = acc + ((const float*)ins[k])[i];
        }
        out[i] = acc;
    }
}

extern "C" __global__ void pskv_sum_f64(double* out, const u64* ins, u32 nin, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        double acc = ((const double*)ins[0])[i];
        for (u32 k = 1; k < nin; ++k) {
            acc = acc + ((const double*)ins[k])[i];
        }
        out[i] = acc;
    }
}

extern "C" __global__ void pskv_sum_f16(u16* out, const u64* ins, u32 nin, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float acc = pskv_h2f(((const u16*)ins[0])[i]);
        for (u32 k = 1; k < nin; ++k) {
            acc = acc + pskv_h2f(((const u16*)ins[k])[i]);
        }
        out[i] = pskv_f2h(acc);
    }
}

// ---- 2-bit ---------------------------------------------------------------

extern "C" __global__ void pskv_quantize_2bit(const float* grad, float* res, u32* codes, u64 n, float t) {
    const u64 limit = (n + 31ull) & ~31ull;
    const u64 nwords = (n + 15ull) / 16ull;
    GRID_STRIDE_LOOP(i, limit) {
        u32 code = 0u;
        if (i < n) {
            float v = res[i] + grad[i];
            if (v >= t) {
                code = 3u;
                v = v - t;
            } else if (v <= -t) {
                code = 2u;
                v = v + t;
            }
            res[i] = v;
        }
        u32 k = (u32)(i & 15ull);
        u32 bits = code << (8u * (k >> 2) + 6u - 2u * (k & 3u));
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 1);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 2);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 4);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 8);
        if (k == 0u && (i >> 4) < nwords) {
            codes[i >> 4] = bits;
        }
    }
}

extern "C" __global__ void pskv_dequantize_2bit(const u32* codes, float* out, u64 n, float t) {
    GRID_STRIDE_LOOP(i, n) {
        u32 k = (u32)(i & 15ull);
        u32 c = (codes[i >> 4] >> (8u * (k >> 2) + 6u - 2u * (k & 3u))) & 3u;
        out[i] = c == 3u ? t : (c == 2u ? -t : 0.0f);
    }
}

// ---- 1-bit ---------------------------------------------------------------

extern "C" __global__ void pskv_quantize_1bit(const float* grad, float* res, u32* codes, u64 n, float t) {
    const u64 limit = (n + 31ull) & ~31ull;
    const u64 nwords = (n + 31ull) / 32ull;
    GRID_STRIDE_LOOP(i, limit) {
        u32 set = 0u;
        if (i < n) {
            float v = res[i] + grad[i];
            if (v > t) {
                set = 1u;
                v = v - 1.0f;
            } else {
                v = v + 1.0f;
            }
            res[i] = v;
        }
        // Lane k holds element k of the word: ballot bit k. MXNet wants bit
        // 0x80 >> (k % 8) of byte k / 8: reverse the 32 bits, then the bytes.
        u32 ballot = __ballot_sync(0xFFFFFFFFu, set);
        if ((i & 31ull) == 0ull && (i >> 5) < nwords) {
            codes[i >> 5] = __byte_perm(__brev(ballot), 0u, 0x0123u);
        }
    }
}

extern "C" __global__ void pskv_dequantize_1bit(const u32* codes, float* out, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        u32 k = (u32)(i & 31ull);
        u32 bit = (codes[i >> 5] >> (8u * (k >> 3) + 7u - (k & 7u))) & 1u;
        out[i] = bit ? 1.0f : -1.0f;
    }
}
