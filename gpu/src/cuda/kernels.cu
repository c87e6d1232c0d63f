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
// Compression kernels give each thread a quad of 4 consecutive elements;
// the threads of a warp hold 32 consecutive quads (block size a multiple of
// 32, grid-stride loops in steps of whole blocks), so a word is assembled
// from its 4 (2-bit) or 8 (1-bit) quads with warp shuffles. Quantize loops
// run to the quad count rounded up to 32 so every lane takes part in the
// shuffles; lanes past n contribute zero.

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
// Every thread takes a quad: 4 consecutive elements, one 16-byte load or
// store where the pointers allow (and the quad is whole), so a warp moves
// 512 contiguous bytes per instruction. A 2-bit quad is one byte of its
// word (byte q % 4), a 1-bit quad one nibble (of byte (q % 8) / 2).

// One element's 2-bit step: the code, and the new residual left in *r.
__device__ __forceinline__ u32 pskv_step_2bit(float* r, float g, float t) {
    float v = *r + g;
    u32 code = 0u;
    if (v >= t) {
        code = 3u;
        v = v - t;
    } else if (v <= -t) {
        code = 2u;
        v = v + t;
    }
    *r = v;
    return code;
}

__device__ __forceinline__ bool pskv_aligned16(const void* a, const void* b) {
    return ((((u64)a) | ((u64)b)) & 15ull) == 0ull;
}

extern "C" __global__ void pskv_quantize_2bit(const float* grad, float* res, u32* codes, u64 n, float t) {
    const u64 nquads = (n + 3ull) / 4ull;
    const u64 limit = (nquads + 31ull) & ~31ull;   // whole warps: every lane shuffles
    const u64 nwords = (n + 15ull) / 16ull;
    const bool vec = pskv_aligned16(grad, res);
    GRID_STRIDE_LOOP(q, limit) {
        const u64 i = q * 4ull;
        u32 byte = 0u;
        if (vec && i + 4ull <= n) {
            float4 g = ((const float4*)grad)[q];
            float4 r = ((const float4*)res)[q];
            byte = (pskv_step_2bit(&r.x, g.x, t) << 6) | (pskv_step_2bit(&r.y, g.y, t) << 4) |
                   (pskv_step_2bit(&r.z, g.z, t) << 2) | pskv_step_2bit(&r.w, g.w, t);
            ((float4*)res)[q] = r;
        } else {
            for (u32 e = 0u; e < 4u && i + e < n; ++e) {
                float r = res[i + e];
                byte |= pskv_step_2bit(&r, grad[i + e], t) << (6u - 2u * e);
                res[i + e] = r;
            }
        }
        u32 bits = byte << (8u * (u32)(q & 3ull));
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 1);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 2);
        if ((q & 3ull) == 0ull && (q >> 2) < nwords) {
            codes[q >> 2] = bits;
        }
    }
}

// Stores (or adds, add != 0) the four values of quad q (elements i..i+4,
// cut at n) into out; vec: out is 16-byte aligned.
__device__ __forceinline__ void pskv_store4(float* out, u64 q, u64 i, u64 n, const float* v, bool vec, u32 add) {
    if (vec && i + 4ull <= n) {
        float4 o = make_float4(v[0], v[1], v[2], v[3]);
        if (add) {
            float4 x = ((float4*)out)[q];
            o = make_float4(x.x + v[0], x.y + v[1], x.z + v[2], x.w + v[3]);
        }
        ((float4*)out)[q] = o;
    } else {
        for (u32 e = 0u; e < 4u && i + e < n; ++e) {
            out[i + e] = add ? out[i + e] + v[e] : v[e];
        }
    }
}

// Dequantize into out, or (add != 0) add to what out holds: the same sums
// as dequantizing into a buffer and adding it.
extern "C" __global__ void pskv_dequantize_2bit(const u32* codes, float* out, u64 n, float t, u32 add) {
    const u64 nquads = (n + 3ull) / 4ull;
    const bool vec = pskv_aligned16(out, out);
    GRID_STRIDE_LOOP(q, nquads) {
        const u64 i = q * 4ull;
        const u32 byte = (codes[q >> 2] >> (8u * (u32)(q & 3ull))) & 0xFFu;
        float v[4];
        for (u32 e = 0u; e < 4u; ++e) {
            u32 c = (byte >> (6u - 2u * e)) & 3u;
            v[e] = c == 3u ? t : (c == 2u ? -t : 0.0f);
        }
        pskv_store4(out, q, i, n, v, vec, add);
    }
}

// ---- 1-bit ---------------------------------------------------------------

// One element's 1-bit step: the bit, and the new residual left in *r.
__device__ __forceinline__ u32 pskv_step_1bit(float* r, float g, float t) {
    float v = *r + g;
    u32 set = 0u;
    if (v > t) {
        set = 1u;
        v = v - 1.0f;
    } else {
        v = v + 1.0f;
    }
    *r = v;
    return set;
}

// Where element 0 of quad j (0..7) of a word sits; element e is e bits lower.
__device__ __forceinline__ u32 pskv_top_1bit(u32 j) {
    return 8u * (j >> 1) + 7u - 4u * (j & 1u);
}

extern "C" __global__ void pskv_quantize_1bit(const float* grad, float* res, u32* codes, u64 n, float t) {
    const u64 nquads = (n + 3ull) / 4ull;
    const u64 limit = (nquads + 31ull) & ~31ull;
    const u64 nwords = (n + 31ull) / 32ull;
    const bool vec = pskv_aligned16(grad, res);
    GRID_STRIDE_LOOP(q, limit) {
        const u64 i = q * 4ull;
        u32 nib = 0u;   // element e at bit 3 - e
        if (vec && i + 4ull <= n) {
            float4 g = ((const float4*)grad)[q];
            float4 r = ((const float4*)res)[q];
            nib = (pskv_step_1bit(&r.x, g.x, t) << 3) | (pskv_step_1bit(&r.y, g.y, t) << 2) |
                  (pskv_step_1bit(&r.z, g.z, t) << 1) | pskv_step_1bit(&r.w, g.w, t);
            ((float4*)res)[q] = r;
        } else {
            for (u32 e = 0u; e < 4u && i + e < n; ++e) {
                float r = res[i + e];
                nib |= pskv_step_1bit(&r, grad[i + e], t) << (3u - e);
                res[i + e] = r;
            }
        }
        u32 bits = nib << (pskv_top_1bit((u32)(q & 7ull)) - 3u);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 1);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 2);
        bits |= __shfl_xor_sync(0xFFFFFFFFu, bits, 4);
        if ((q & 7ull) == 0ull && (q >> 3) < nwords) {
            codes[q >> 3] = bits;
        }
    }
}

extern "C" __global__ void pskv_dequantize_1bit(const u32* codes, float* out, u64 n, u32 add) {
    const u64 nquads = (n + 3ull) / 4ull;
    const bool vec = pskv_aligned16(out, out);
    GRID_STRIDE_LOOP(q, nquads) {
        const u64 i = q * 4ull;
        const u32 nib = (codes[q >> 3] >> (pskv_top_1bit((u32)(q & 7ull)) - 3u)) & 0xFu;
        float v[4];
        for (u32 e = 0u; e < 4u; ++e) {
            v[e] = ((nib >> (3u - e)) & 1u) ? 1.0f : -1.0f;
        }
        pskv_store4(out, q, i, n, v, vec, add);
    }
}
