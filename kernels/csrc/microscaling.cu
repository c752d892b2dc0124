// Microscaling / FP8 fake quantization (qat/microscaling.py is the definition; docs/math.md, section 13).
// Float element formats (elem: 0 = E2M1, 1 = E4M3, 2 = E5M2), round to nearest even, saturating, NaN kept,
// with the scale S of each element from one of (kind):
//   0  a float32 scale per tensor (C = 1) or per channel: key = (i / inner) % C       (FP8)
//   1  E8M0: 2^clamp(floor(log2 amax) - emax, -127, 127), amax over the element's block (MXFP4 / MXFP8)
//   2  E4M3 block code times the tensor scale s: c = rnd_e4m3(amax / (s * 6)), S = c * s  (NVFP4)
// Blocks are `block` (16 or 32) consecutive elements of the contiguous tensor (the caller checks that the
// last axis divides into them), so a block lies inside one warp's 32 elements and its amax (over finite
// elements) is a warp shuffle reduction. One warp handles 32 consecutive elements (one mask word), one
// element a lane; the loop over warps is grid-stride (64-bit indices).
//   mx_forward:       y = rnd(x * (1 / S)) * S and the packed 1-bit clip mask (|x / S| <= max) that
//                     fake_quant.cu's fq_backward applies (the straight-through backward);
//   mx_lsq_backward:  dx = grad * inside and the learned scale's raw gradient
//                     dscale[key] += grad * c * (q - v * inside) (v = x / S, c = 1 for kind 0), summed a warp
//                     where the warp's elements share a key (and over its steps while the key stays), one
//                     atomicAdd a sum; the host multiplies by grad_factor.
// Included after common.cuh; every float op rounds as PyTorch's (--fmad=false, IEEE division).
#include "common.cuh"

struct MxElem {
  int mbits;
  int emin;
  int emax;
  float maxv;
};

__device__ __forceinline__ MxElem mx_elem(int k) {
  MxElem f;
  if (k == 0) {
    f.mbits = 1; f.emin = 0; f.emax = 2; f.maxv = 6.0f;
  } else if (k == 1) {
    f.mbits = 3; f.emin = -6; f.emax = 8; f.maxv = 448.0f;
  } else {
    f.mbits = 2; f.emin = -14; f.emax = 15; f.maxv = 57344.0f;
  }
  return f;
}

// 2^k exactly, k in [-149, 127] (subnormal below -126): qat.microscaling.pow2
__device__ __forceinline__ float mx_pow2(int k) {
  return k >= -126 ? __int_as_float((k + 127) << 23) : __int_as_float(1 << (k + 149));
}

// qat.microscaling.round_to_element: a = min(|v|, max), k = max(floor(log2 a), emin),
// q = sign(v) * rint(a * 2^(mbits - k)) * 2^(k - mbits)
__device__ __forceinline__ float mx_round(float v, const MxElem& f) {
  if (v != v) return v;
  const float a = fminf(fabsf(v), f.maxv);
  int k = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;  // floor(log2 a) for a normal a
  if (k < f.emin) k = f.emin;                                  // subnormal a, zero: the bottom binade
  const float q = rintf(a * mx_pow2(f.mbits - k)) * mx_pow2(k - f.mbits);
  return copysignf(q, v);
}

// |x| where finite, else 0 (block ranges leave NaN / Inf out)
__device__ __forceinline__ float mx_finite_abs(float x) {
  const float a = fabsf(x);
  return a <= 3.4028234663852886e+38f ? a : 0.0f;
}

// The scale S of element i and its block code c (1 without one); `a` is this lane's finite |x|. Called by
// all 32 lanes of the warp together (the shuffles).
__device__ __forceinline__ void mx_scale(float a, long long i, const float* __restrict__ scale, long long inner,
                                         long long C, const MxElem& f, int block, int kind, float& S, float& c,
                                         long long& key) {
  key = 0;
  c = 1.0f;
  if (kind == 0) {
    if (C > 1) key = (i / inner) % C;
    S = __ldg(scale + key);
    return;
  }
  float amax = a;
  for (int off = block >> 1; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(QAT_FULL, amax, off));
  if (kind == 1) {
    int e = -127;
    if (amax >= 1.1754943508222875e-38f) {  // 2^-126: a normal amax, floor(log2) from its exponent bits
      e = (int)((__float_as_uint(amax) >> 23) & 0xffu) - 127 - f.emax;
      e = e < -127 ? -127 : (e > 127 ? 127 : e);
    }
    S = mx_pow2(e);
    return;
  }
  const float st = __ldg(scale);
  const MxElem e4m3 = mx_elem(1);
  c = mx_round(amax / (st * 6.0f), e4m3);
  S = c * st;
}

// v = x * (1 / S); a zero scale (an NVFP4 block code of 0) maps everything but NaN to 0
__device__ __forceinline__ float mx_scaled(float xf, float S) {
  if (S != 0.0f) return xf * (1.0f / S);
  return xf != xf ? xf : 0.0f;
}

// One lane's element i of the warp's 32 (valid: i < n) with its scale S, block code c, parameter key,
// v = x / S and whether |v| <= max. All 32 lanes call it together (the block amax shuffles).
struct MxElement {
  long long i, key;
  bool valid, inside;
  float S, c, v;
};

__device__ __forceinline__ MxElement mx_element(const scalar_t* __restrict__ x, long long i, long long n,
                                                const float* __restrict__ scale, long long inner, long long C,
                                                const MxElem& f, int block, int kind) {
  MxElement e;
  e.i = i;
  e.valid = i < n;
  const float xf = e.valid ? to_f(x[i]) : 0.0f;
  mx_scale(mx_finite_abs(xf), e.valid ? i : 0, scale, inner, C, f, block, kind, e.S, e.c, e.key);
  e.v = mx_scaled(xf, e.S);
  e.inside = fabsf(e.v) <= f.maxv;
  return e;
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
mx_forward(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, unsigned* __restrict__ mask,
           const float* __restrict__ scale, long long n, long long inner, long long C, int elem, int block,
           int kind) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = (n + 31) >> 5;
  const long long stride = (long long)gridDim.x * (blockDim.x >> 5);
  const MxElem f = mx_elem(elem);
  for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < nwarps; w += stride) {
    const MxElement e = mx_element(x, (w << 5) + lane, n, scale, inner, C, f, block, kind);
    const unsigned word = __ballot_sync(QAT_FULL, e.valid && e.inside);
    if (e.valid) y[e.i] = from_f(mx_round(e.v, f) * e.S);
    if (lane == 0) mask[w] = word;
  }
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
mx_lsq_backward(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                float* __restrict__ dscale, const float* __restrict__ scale, long long n, long long inner,
                long long C, int elem, int block, int kind) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = (n + 31) >> 5;
  const long long stride = (long long)gridDim.x * (blockDim.x >> 5);
  const MxElem f = mx_elem(elem);
  // lane 0 carries the warp's running sum for one key across its grid-stride steps and adds it to
  // dscale when the key changes and at the end: one atomic a warp for a per-tensor scale (one a step
  // made 2M same-address atomics at 64M elements, 13-25x the copy time on an H200)
  float acc = 0.0f;
  long long acc_key = -1;
  for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < nwarps; w += stride) {
    const MxElement e = mx_element(x, (w << 5) + lane, n, scale, inner, C, f, block, kind);
    const float g = e.valid ? to_f(grad[e.i]) : 0.0f;
    float contrib = (g * e.c) * (mx_round(e.v, f) - (e.inside ? e.v : 0.0f));
    if (e.v != e.v || !e.valid) contrib = 0.0f;
    if (e.valid) dx[e.i] = from_f(e.inside ? g : 0.0f);
    // the warp's sum when its elements share a scale, else one atomic a lane
    const long long k0 = __shfl_sync(QAT_FULL, e.key, 0);
    if (__all_sync(QAT_FULL, e.key == k0 || !e.valid)) {
      float sum = contrib;
      for (int off = 16; off >= 1; off >>= 1) sum += __shfl_down_sync(QAT_FULL, sum, off);
      if (lane == 0) {
        if (k0 != acc_key) {
          if (acc_key >= 0) atomicAdd(dscale + acc_key, acc);
          acc = 0.0f;
          acc_key = k0;
        }
        acc += sum;
      }
    } else if (e.valid) {
      atomicAdd(dscale + e.key, contrib);
    }
  }
  if (lane == 0 && acc_key >= 0) atomicAdd(dscale + acc_key, acc);
}
