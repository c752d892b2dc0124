// Element-wise fake-quant kernels: forward quantize-dequantize (writing the 1-bit STE mask) and the
// clipped-STE backward that reads it. Included after common.cuh.
#include "common.cuh"

// Forward quantize-dequantize, one pass:
//   q_raw = rnd(x * inv_s) + z,  q = clamp(q_raw, qmin, qmax),  y = (q - z) * s,  inv_s = 1 / s
//   mask bit = qmin <= q_raw <= qmax  (the clipped STE passes the gradient)
// VARIANT 0: z as given (fake_quantize); 1: LSQ, z used as clamp(rint(z), qmin, qmax);
//         2: PACT, s = alpha / (qmax - qmin), z = qmin, x clipped to [0, alpha] first (no mask).
// KEYMODE 0: one parameter (per tensor); 1: one key per vector (inner % QAT_VEC == 0), found with
//         one divide per vector; 2: a key per element, walked without dividing (KeyIter).
// Indexing: warp-uniform grid-stride loop over warp steps of 32 * QAT_VEC contiguous elements, so
// the mask of one step is QAT_VEC whole 32-bit words: each lane ORs its QAT_VEC bits with the
// 32/QAT_VEC - 1 neighbours that share its word (xor shuffles; a ballot when QAT_VEC == 1).
// Bytes: reads x (and the parameters, cached), writes y and numel/8 bytes of mask.
template <int VARIANT>
struct FwdParam {
  float s, z, inv_s, a;
  long long key;
  __device__ __forceinline__ void load(long long k, const float* __restrict__ scale, const float* __restrict__ zp,
                                       const float* __restrict__ alpha, float qmin, float qmax) {
    if (k == key) return;
    key = k;
    if (VARIANT == 2) {
      a = __ldg(alpha);
      s = a / (qmax - qmin);
      z = qmin;
    } else {
      s = __ldg(scale + k);
      z = __ldg(zp + k);
      if (VARIANT == 1) z = qclamp(rintf(z), qmin, qmax);
    }
    inv_s = 1.0f / s;
  }
};

template <int VARIANT>
__device__ __forceinline__ float fwd_elem(const FwdParam<VARIANT>& p, float xf, float qmin, float qmax, int mode,
                                          bool& inside) {
  if (VARIANT == 2) {
    xf = xf < 0.0f ? 0.0f : xf;  // torch.clamp(x, min=0), NaN kept
    xf = xf > p.a ? p.a : xf;    // torch.minimum(., alpha)
  }
  const float qr = qround(xf * p.inv_s, mode) + p.z;
  inside = (qr >= qmin) && (qr <= qmax);
  return (qclamp(qr, qmin, qmax) - p.z) * p.s;
}

__device__ __forceinline__ void write_mask(unsigned* __restrict__ mask, long long step, unsigned bits, long long nwords) {
  const int lane = threadIdx.x & 31;
#if QAT_VEC == 1
  const unsigned w = __ballot_sync(QAT_FULL, bits);
  if (lane == 0 && step < nwords) mask[step] = w;
#else
  const int lanes_per_word = 32 / QAT_VEC;
  unsigned w = bits << ((lane % lanes_per_word) * QAT_VEC);
#pragma unroll
  for (int off = lanes_per_word / 2; off > 0; off >>= 1) w |= __shfl_xor_sync(QAT_FULL, w, off);
  const long long word = step * QAT_VEC + lane / lanes_per_word;
  if (lane % lanes_per_word == 0 && word < nwords) mask[word] = w;
#endif
}

template <int VARIANT, int KEYMODE>
__device__ __forceinline__ void fwd_vec(FwdParam<VARIANT>& p, const RawVec& xv, RawVec& yv, long long e0, int nvalid,
                                        unsigned& bits, const float* __restrict__ scale, const float* __restrict__ zp,
                                        const float* __restrict__ alpha, long long inner, long long C, float qmin,
                                        float qmax, int mode) {
  bits = 0;
  if (KEYMODE == 2) {
    KeyIter it;
    it.init(e0, inner, C);
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      if (j) it.next();
      p.load(it.key, scale, zp, alpha, qmin, qmax);
      bool inside;
      yv.s[j] = from_f(fwd_elem(p, to_f(xv.s[j]), qmin, qmax, mode, inside));
      bits |= (unsigned)(inside && j < nvalid) << j;
    }
  } else {
    if (KEYMODE == 1) {
      long long q, r, k;
      divmod64(e0, inner, q, r);
      divmod64(q, C, r, k);
      p.load(k, scale, zp, alpha, qmin, qmax);
    }
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      bool inside;
      yv.s[j] = from_f(fwd_elem(p, to_f(xv.s[j]), qmin, qmax, mode, inside));
      bits |= (unsigned)(inside && j < nvalid) << j;
    }
  }
}

template <int VARIANT, int KEYMODE>
__device__ __forceinline__ void fwd_body(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                         unsigned* __restrict__ mask, const float* __restrict__ scale,
                                         const float* __restrict__ zp, const float* __restrict__ alpha, long long n,
                                         long long inner, long long C, float qmin, float qmax, int mode) {
  FwdParam<VARIANT> p;
  p.key = -1;
  p.s = p.z = p.inv_s = p.a = 0.0f;
  if (KEYMODE == 0) p.load(0, scale, zp, alpha, qmin, qmax);

  const int lane = threadIdx.x & 31;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long step_elems = 32LL * QAT_VEC;
  const long long nsteps = (n + step_elems - 1) / step_elems;
  const long long nwords = (n + 31) >> 5;

  // Two warp steps per iteration: both loads are issued before either is used.
  for (long long st0 = warp; st0 < nsteps; st0 += 2 * nwarps) {
    const long long st1 = st0 + nwarps;
    const bool has1 = st1 < nsteps;  // warp-uniform
    const long long e0 = st0 * step_elems + (long long)lane * QAT_VEC;
    const long long e1 = st1 * step_elems + (long long)lane * QAT_VEC;
    const int nv0 = (int)max(0LL, min((long long)QAT_VEC, n - e0));
    const int nv1 = has1 ? (int)max(0LL, min((long long)QAT_VEC, n - e1)) : 0;
    const RawVec x0 = load_vec(x, e0, nv0);
    RawVec x1;
    if (has1) x1 = load_vec(x, e1, nv1);

    RawVec y0;
    unsigned b0;
    fwd_vec<VARIANT, KEYMODE>(p, x0, y0, e0, nv0, b0, scale, zp, alpha, inner, C, qmin, qmax, mode);
    store_vec(y, e0, nv0, y0);
    if (VARIANT == 0) write_mask(mask, st0, b0, nwords);
    if (has1) {
      RawVec y1;
      unsigned b1;
      fwd_vec<VARIANT, KEYMODE>(p, x1, y1, e1, nv1, b1, scale, zp, alpha, inner, C, qmin, qmax, mode);
      store_vec(y, e1, nv1, y1);
      if (VARIANT == 0) write_mask(mask, st1, b1, nwords);
    }
  }
}

// variant: 0 STE (writes the mask), 1 LSQ, 2 PACT; keymode: see above (PACT: 0).
extern "C" __global__ void __launch_bounds__(QAT_THREADS)
fq_forward(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, unsigned* __restrict__ mask,
           const float* __restrict__ scale, const float* __restrict__ zp, const float* __restrict__ alpha,
           long long n, long long inner, long long C, float qmin, float qmax, int round_mode, int variant,
           int keymode) {
#define QAT_FWD(V, K) fwd_body<V, K>(x, y, mask, scale, zp, alpha, n, inner, C, qmin, qmax, round_mode)
  if (variant == 2) {
    QAT_FWD(2, 0);
  } else if (variant == 1) {
    if (keymode == 0) QAT_FWD(1, 0);
    else if (keymode == 1) QAT_FWD(1, 1);
    else QAT_FWD(1, 2);
  } else {
    if (keymode == 0) QAT_FWD(0, 0);
    else if (keymode == 1) QAT_FWD(0, 1);
    else QAT_FWD(0, 2);
  }
#undef QAT_FWD
}

// Clipped-STE backward: dx = grad where the saved mask bit is set, else 0. A lane's QAT_VEC
// elements lie in one mask word (QAT_VEC divides 32 and e0 is a multiple of QAT_VEC).
// Bytes: reads grad and numel/8 bytes of mask, writes dx.
extern "C" __global__ void __launch_bounds__(QAT_THREADS)
fq_backward(const scalar_t* __restrict__ g, const unsigned* __restrict__ mask, scalar_t* __restrict__ dx, long long n) {
  const long long nthreads = (long long)gridDim.x * blockDim.x;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long nvec = (n + QAT_VEC - 1) / QAT_VEC;
  for (long long v0 = tid; v0 < nvec; v0 += 2 * nthreads) {
    const long long v1 = v0 + nthreads;
    const bool has1 = v1 < nvec;
    const long long e0 = v0 * QAT_VEC, e1 = v1 * QAT_VEC;
    const int nv0 = (int)min((long long)QAT_VEC, n - e0);
    const int nv1 = has1 ? (int)min((long long)QAT_VEC, n - e1) : 0;
    RawVec g0 = load_vec(g, e0, nv0);
    const unsigned w0 = __ldg(mask + (e0 >> 5)) >> (e0 & 31);
    RawVec g1;
    unsigned w1 = 0;
    if (has1) {
      g1 = load_vec(g, e1, nv1);
      w1 = __ldg(mask + (e1 >> 5)) >> (e1 & 31);
    }
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j)
      if (!((w0 >> j) & 1u)) g0.s[j] = scalar_zero();
    store_vec(dx, e0, nv0, g0);
    if (has1) {
#pragma unroll
      for (int j = 0; j < QAT_VEC; ++j)
        if (!((w1 >> j) & 1u)) g1.s[j] = scalar_zero();
      store_vec(dx, e1, nv1, g1);
    }
  }
}
