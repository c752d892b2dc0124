// Element-wise fake-quant kernels: forward quantize-dequantize (writing the 1-bit STE mask) and the
// clipped-STE backward that reads it. Included after common.cuh.
#include "common.cuh"

// Forward quantize-dequantize, one pass:
//   q_raw = rnd(x * inv_s) + z,  q = clamp(q_raw, qmin, qmax),  y = (q - z) * s,  inv_s = 1 / s
//   mask bit = qmin <= q_raw <= qmax  (the clipped STE passes the gradient)
// variant 0: z as given (fake_quantize); 1: LSQ, z used as clamp(rint(z), qmin, qmax);
// 2: PACT, s = alpha / (qmax - qmin), z = qmin, x clipped to [0, alpha] first (no mask).
// Indexing: warp-uniform grid-stride loop over warp steps of 32 * QAT_VEC contiguous elements, so
// the mask of one step is QAT_VEC whole 32-bit words: each lane ORs its QAT_VEC bits with the
// 32/QAT_VEC - 1 neighbours that share its word (xor shuffles; a ballot when QAT_VEC == 1).
// Bytes: reads x (and the parameters, cached), writes y and numel/8 bytes of mask.
struct FwdParams {
  const float* scale;
  const float* zp;
  const float* alpha;
  long long inner, C;
  float qmin, qmax;
  int round_mode, variant;
  // cached parameter of the current key
  long long key;
  float s, z, inv_s, a;

  __device__ __forceinline__ void load(long long k) {
    if (k == key) return;
    key = k;
    if (variant == 2) {
      a = alpha[0];
      s = a / (qmax - qmin);
      z = qmin;
    } else {
      s = scale[k];
      z = zp[k];
      if (variant == 1) z = qclamp(rintf(z), qmin, qmax);
    }
    inv_s = 1.0f / s;
  }
};

__device__ __forceinline__ void fwd_step(FwdParams& p, const RawVec& xv, RawVec& yv, long long e0, int nvalid,
                                         unsigned& bits) {
  KeyIter it;
  it.init(e0, p.inner, p.C);
  bits = 0;
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j) {
    if (j) it.next();
    p.load(it.key);
    float xf = to_f(xv.s[j]);
    if (p.variant == 2) {
      xf = xf < 0.0f ? 0.0f : xf;  // torch.clamp(x, min=0), NaN kept
      xf = xf > p.a ? p.a : xf;  // torch.minimum(., alpha)
    }
    const float qr = qround(xf * p.inv_s, p.round_mode) + p.z;
    const float q = qclamp(qr, p.qmin, p.qmax);
    yv.s[j] = from_f((q - p.z) * p.s);
    const bool inside = (qr >= p.qmin) && (qr <= p.qmax) && (j < nvalid);
    bits |= (unsigned)inside << j;
  }
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

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
fq_forward(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, unsigned* __restrict__ mask,
           const float* __restrict__ scale, const float* __restrict__ zp, const float* __restrict__ alpha,
           long long n, long long inner, long long C, float qmin, float qmax, int round_mode, int variant) {
  FwdParams p;
  p.scale = scale;
  p.zp = zp;
  p.alpha = alpha;
  p.inner = inner;
  p.C = C;
  p.qmin = qmin;
  p.qmax = qmax;
  p.round_mode = round_mode;
  p.variant = variant;
  p.key = -1;
  p.s = p.z = p.inv_s = p.a = 0.0f;

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
    fwd_step(p, x0, y0, e0, nv0, b0);
    store_vec(y, e0, nv0, y0);
    if (mask) write_mask(mask, st0, b0, nwords);
    if (has1) {
      RawVec y1;
      unsigned b1;
      fwd_step(p, x1, y1, e1, nv1, b1);
      store_vec(y, e1, nv1, y1);
      if (mask) write_mask(mask, st1, b1, nwords);
    }
  }
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
