// Fused "range of the data" fake quantization: each parameter owns one contiguous row of the input
// (per token, per group, per channel on axis 0), and one warp does, for its row, in one pass over HBM:
//   1. the row's min / max over its finite elements (NaN / +-Inf left out; none: the empty range),
//   2. (observer state given) the merge into the stored range as a first batch sets it
//      (min_val / max_val replaced where the row had data, kept where it had none; seen |= has),
//   3. the scale and zero point of that range, exactly as qat.observers.qparams_from_range computes
//      them with PyTorch on a CUDA device (written back to scale / zero_point when given),
//   4. the quantize-dequantize of fake_quant.cu (fwd_elem) and the packed 1-bit STE mask.
// The row stays in registers between 1 and 4 (NV 16-byte vectors a lane), so x is read once.
// Included after common.cuh. Host side: cupy_backend.fake_quantize_minmax_forward.
#include "common.cuh"

// the per-element forward and fwd_elem of fake_quant.cu are not shared by include (that file has entry
// points); the two lines of math below are the same expressions.
template <int RMODE>
__device__ __forceinline__ float rows_elem(float s, float z, float inv_s, float xf, float qmin, float qmax,
                                           bool& inside) {
  const float qr = qround_t<RMODE>(xf * inv_s) + z;
  inside = (qr >= qmin) && (qr <= qmax);
  return (qclamp(qr, qmin, qmax) - z) * s;
}

__device__ __forceinline__ float f16_round(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
}

// a * (1 / d) where PyTorch's CUDA true division by a Python scalar multiplies by the float32
// reciprocal (recip != 0), a / d where it divides
__device__ __forceinline__ float div_scalar(float a, float d, float inv_d, int recip) {
  return recip ? a * inv_d : a / d;
}

// qat.observers.qparams_from_range for one (mn, mx): scheme 0 symmetric signed, 1 symmetric unsigned,
// 2 asymmetric; f16: the scale rounded to float16 (ScaleDtype.FLOAT16). mn / mx are never NaN here
// (finite, or the empty range +inf / -inf, which clamps to [0, 0]).
__device__ __forceinline__ void qparams_of(float mn, float mx, float qmin, float qmax, int scheme, float div,
                                           float inv_div, int recip, int f16, float& s, float& z) {
  const float eps = 1.1920928955078125e-07f;  // torch.finfo(torch.float32).eps
  mn = fminf(mn, 0.0f);                        // torch.clamp(mn, max=0)
  mx = fmaxf(mx, 0.0f);                        // torch.clamp(mx, min=0)
  if (scheme == 0) s = div_scalar(fmaxf(-mn, mx), div, inv_div, recip);  // / ((qmax - qmin) / 2)
  else if (scheme == 1) s = div_scalar(mx, div, inv_div, recip);         // / (qmax - qmin)
  else s = div_scalar(mx - mn, div, inv_div, recip);                     // / (qmax - qmin)
  // _finish_scale: nan_to_num(nan=eps, posinf=float32 max), clamp(min=eps), optional float16
  if (s != s) s = eps;
  else if (s == __int_as_float(0x7f800000)) s = 3.4028234663852886e+38f;
  s = fmaxf(s, eps);
  if (f16) s = f16_round(fminf(fmaxf(s, 6.103515625e-05f), 65504.0f));
  z = scheme == 2 ? qclamp(qmin - rintf(mn / s), qmin, qmax) : 0.0f;
}

// One warp a row of L = nvec * QAT_VEC elements (L % 32 == 0, so a row's mask words are its own);
// NV >= ceil(nvec / 32) vectors a lane kept in registers. State pointers null: dynamic (nothing
// stored); otherwise all five are given (min_val, max_val, seen, scale, zp: nrows entries each).
template <int NV, int RMODE>
__device__ __forceinline__ void rows_body(const scalar_t* __restrict__ x, oscalar_t* __restrict__ y,
                                          unsigned* __restrict__ mask, long long nrows, int nvec, float qmin,
                                          float qmax, int scheme, float div, float inv_div, int recip, int f16,
                                          float* __restrict__ min_val, float* __restrict__ max_val,
                                          unsigned char* __restrict__ seen, float* __restrict__ scale,
                                          float* __restrict__ zp) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= nrows) return;  // warp-uniform
  const long long base = row * (long long)nvec * QAT_VEC;
  const float inf = __int_as_float(0x7f800000);
  RawVec xv[NV];
  float mn = inf, mx = -inf;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + 32 * i;
    if (v < nvec) {
      xv[i] = load_vec(x, base + (long long)v * QAT_VEC, QAT_VEC);
#pragma unroll
      for (int j = 0; j < QAT_VEC; ++j) {
        const float f = to_f(xv[i].s[j]);
        if (fabsf(f) < inf) {  // finite only (NaN compares false)
          mn = fminf(mn, f);
          mx = fmaxf(mx, f);
        }
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(QAT_FULL, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(QAT_FULL, mx, off));
  }
  if (min_val != nullptr) {
    const bool has = mn <= mx;  // the row saw a finite value: its range replaces the stored one
    if (!has) {
      mn = min_val[row];
      mx = max_val[row];
    }
    __syncwarp();
    if (lane == 0) {
      min_val[row] = mn;
      max_val[row] = mx;
      seen[row] = (unsigned char)(seen[row] | (unsigned char)has);
    }
  }
  float s, z;
  qparams_of(mn, mx, qmin, qmax, scheme, div, inv_div, recip, f16, s, z);
  if (scale != nullptr && lane == 0) {
    scale[row] = s;
    zp[row] = z;
  }
  const float inv_s = 1.0f / s;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (32 * i >= nvec) break;  // warp-uniform
    const int v = lane + 32 * i;
    const bool valid = v < nvec;
    const long long e = base + (long long)v * QAT_VEC;
    unsigned bits = 0;
    if (valid) {
      ORawVec yv;
#pragma unroll
      for (int j = 0; j < QAT_VEC; ++j) {
        bool inside;
        yv.s[j] = out_of(rows_elem<RMODE>(s, z, inv_s, to_f(xv[i].s[j]), qmin, qmax, inside));
        bits |= (unsigned)inside << j;
      }
      store_ovec(y, e, QAT_VEC, yv);
    }
#if QAT_VEC == 1
    const unsigned w = __ballot_sync(QAT_FULL, bits);
    if (lane == 0) mask[(base + 32LL * i) >> 5] = w;  // nvec % 32 == 0: every lane valid
#else
    const int lanes_per_word = 32 / QAT_VEC;
    unsigned w = bits << ((lane % lanes_per_word) * QAT_VEC);
#pragma unroll
    for (int off = lanes_per_word / 2; off > 0; off >>= 1) w |= __shfl_xor_sync(QAT_FULL, w, off);
    if (valid && lane % lanes_per_word == 0) mask[e >> 5] = w;
#endif
  }
}

// fq_rows_<NV>: rows of up to 32 * NV vectors. Arguments: x, y, mask, nrows, nvec (vectors a row),
// qmin, qmax, scheme, div, inv_div, recip, f16, round_mode, then the state pointers (0: dynamic).
#define QAT_ROWS_KERNEL(NV)                                                                                  \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) fq_rows_##NV(                                   \
      const scalar_t* __restrict__ x, oscalar_t* __restrict__ y, unsigned* __restrict__ mask, long long nrows, \
      int nvec, float qmin, float qmax, int scheme, float div, float inv_div, int recip, int f16, int round_mode, \
      float* __restrict__ min_val, float* __restrict__ max_val, unsigned char* __restrict__ seen,             \
      float* __restrict__ scale, float* __restrict__ zp) {                                                    \
    if (round_mode == 0)                                                                                      \
      rows_body<NV, 0>(x, y, mask, nrows, nvec, qmin, qmax, scheme, div, inv_div, recip, f16, min_val, max_val, \
                       seen, scale, zp);                                                                      \
    else if (round_mode == 1)                                                                                 \
      rows_body<NV, 1>(x, y, mask, nrows, nvec, qmin, qmax, scheme, div, inv_div, recip, f16, min_val, max_val, \
                       seen, scale, zp);                                                                      \
    else                                                                                                      \
      rows_body<NV, 2>(x, y, mask, nrows, nvec, qmin, qmax, scheme, div, inv_div, recip, f16, min_val, max_val, \
                       seen, scale, zp);                                                                      \
  }
QAT_ROWS_KERNEL(1)
QAT_ROWS_KERNEL(2)
QAT_ROWS_KERNEL(4)
QAT_ROWS_KERNEL(8)
QAT_ROWS_KERNEL(16)
#undef QAT_ROWS_KERNEL
