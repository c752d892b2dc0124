// Element-wise fake-quant kernels: forward quantize-dequantize (writing the 1-bit STE mask) and the
// clipped-STE backward that reads it. Included after common.cuh.
#include "common.cuh"

// Forward quantize-dequantize, one pass:
//   q_raw = rnd(x * inv_s) + z,  q = clamp(q_raw, qmin, qmax),  y = (q - z) * s,  inv_s = 1 / s
//   mask bit = qmin <= q_raw <= qmax  (the clipped STE passes the gradient)
// VARIANT 0: z as given (fake_quantize); 1: LSQ, z used as clamp(rint(z), qmin, qmax);
//         2: PACT, s = alpha / (qmax - qmin), z = qmin, x clipped to [0, alpha] first (no mask).
// KEYMODE 0: one parameter (per tensor); 1: one key per vector (inner % QAT_VEC == 0), found with
//         one divide per vector; 2: a key per element, walked without dividing (KeyIter);
//         3: channels on the last axis (inner == 1, C % QAT_VEC == 0): parameters read as vectors.
// Indexing: warp-uniform grid-stride loop over warp steps of 32 * QAT_VEC contiguous elements, so
// the mask of one step is QAT_VEC whole 32-bit words: each lane ORs its QAT_VEC bits with the
// 32/QAT_VEC - 1 neighbours that share its word (xor shuffles; a ballot when QAT_VEC == 1).
// Bytes: reads x (and the parameters, cached), writes y and numel/8 bytes of mask.
// A warp's two steps of an iteration are adjacent (2w, 2w + 1), and key mode 1 loads both steps'
// parameters together with x (v9: forward 0.980 fp32 / 0.975 16-bit of steps w and w + nwarps with the
// parameters loaded at each step's work). Launch bounds: QAT_THREADS, no minimum (ptxas's choice).

template <int VARIANT>
struct FwdParam {
  float s, z, inv_s, a;
  long long key;
  // from parameters already loaded (key mode 1, fwd_body): s and the raw zero point of key k
  __device__ __forceinline__ void set(long long k, float s_, float z_, float qmin, float qmax) {
    if (k == key) return;
    key = k;
    s = s_;
    z = VARIANT == 1 ? qclamp(rintf(z_), qmin, qmax) : z_;
    inv_s = 1.0f / s;
  }
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

template <int VARIANT, int RMODE>
__device__ __forceinline__ float fwd_elem(const FwdParam<VARIANT>& p, float xf, float qmin, float qmax, bool& inside) {
  if (VARIANT == 2) xf = qclamp(xf, 0.0f, p.a);  // torch.minimum(torch.clamp(x, min=0), alpha), NaN kept
  const float qr = qround_t<RMODE>(xf * p.inv_s) + p.z;
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

// One lane's vector. FULL: all QAT_VEC elements are inside the tensor (every step but the last).
// Key modes 0 and 1 find p set (key mode 1: by fwd_body, with both steps' parameters).
template <int VARIANT, int KEYMODE, int RMODE, bool FULL>
__device__ __forceinline__ void fwd_vec(FwdParam<VARIANT>& p, const RawVec& xv, ORawVec& yv, long long e0, int nvalid,
                                        unsigned& bits, const float* __restrict__ scale,
                                        const float* __restrict__ zp,
                                        const float* __restrict__ alpha, const FastDiv& inner, const FastDiv& C,
                                        float qmin, float qmax) {
  bits = 0;
  if (KEYMODE == 2) {
    KeyIter it;
    it.init(e0, inner, C);
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      if (j) it.next();
      p.load(it.key, scale, zp, alpha, qmin, qmax);
      bool inside;
      yv.s[j] = out_of(fwd_elem<VARIANT, RMODE>(p, to_f(xv.s[j]), qmin, qmax, inside));
      bits |= (unsigned)(inside && (FULL || j < nvalid)) << j;
    }
  } else if (KEYMODE == 3) {
    // channels on the last axis (inner == 1, C % QAT_VEC == 0): the vector's QAT_VEC consecutive
    // channels' parameters are themselves read as 16-byte vectors (loading them with x, before any
    // work, measured 0.995 fp32 and took 62-66 registers in 16-bit: v9)
    const long long k0 = e0 - C.div(e0) * C.d;  // inner == 1
    float sv[QAT_VEC], zv[QAT_VEC];
    load_params(scale + k0, sv);
    load_params(zp + k0, zv);
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      FwdParam<VARIANT> pj;
      pj.s = sv[j];
      pj.z = VARIANT == 1 ? qclamp(rintf(zv[j]), qmin, qmax) : zv[j];
      pj.inv_s = 1.0f / pj.s;
      bool inside;
      yv.s[j] = out_of(fwd_elem<VARIANT, RMODE>(pj, to_f(xv.s[j]), qmin, qmax, inside));
      bits |= (unsigned)(inside && (FULL || j < nvalid)) << j;
    }
  } else {
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      bool inside;
      yv.s[j] = out_of(fwd_elem<VARIANT, RMODE>(p, to_f(xv.s[j]), qmin, qmax, inside));
      bits |= (unsigned)(inside && (FULL || j < nvalid)) << j;
    }
  }
}

template <int VARIANT, int KEYMODE, int RMODE>
__device__ __forceinline__ void fwd_one(FwdParam<VARIANT>& p, const RawVec& xv, oscalar_t* __restrict__ y,
                                        unsigned* __restrict__ mask, long long st, long long e, int nv, long long nwords,
                                        const float* __restrict__ scale,
                                        const float* __restrict__ zp,
                                        const float* __restrict__ alpha, const FastDiv& inner, const FastDiv& C,
                                        float qmin, float qmax) {
  ORawVec yv;
  unsigned bits;
  if (nv == QAT_VEC) {
    fwd_vec<VARIANT, KEYMODE, RMODE, true>(p, xv, yv, e, nv, bits, scale, zp, alpha, inner, C, qmin, qmax);
    store_ovec(y, e, QAT_VEC, yv);
  } else {
    fwd_vec<VARIANT, KEYMODE, RMODE, false>(p, xv, yv, e, nv, bits, scale, zp, alpha, inner, C, qmin, qmax);
    store_ovec(y, e, nv, yv);
  }
  if (VARIANT == 0) write_mask(mask, st, bits, nwords);
}

template <int VARIANT, int KEYMODE, int RMODE>
__device__ __forceinline__ void fwd_body(const scalar_t* __restrict__ x, oscalar_t* __restrict__ y,
                                         unsigned* __restrict__ mask, const float* __restrict__ scale,
                                         const float* __restrict__ zp, const float* __restrict__ alpha, long long n,
                                         const FastDiv& inner, const FastDiv& C, float qmin, float qmax) {
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
  // Grid-stride over warp steps, two steps per iteration: both loads are issued before either is
  // used. (A deeper software pipeline cost registers and ran ~7% slower on an H100.)
  for (long long st0 = 2 * warp; st0 < nsteps; st0 += 2 * nwarps) {
    const long long st1 = st0 + 1;  // adjacent steps: one run of a long channel keeps its parameters
    const bool has1 = st1 < nsteps;  // warp-uniform
    const long long e0 = st0 * step_elems + (long long)lane * QAT_VEC;
    const long long e1 = st1 * step_elems + (long long)lane * QAT_VEC;
    const int nv0 = (int)max(0LL, min((long long)QAT_VEC, n - e0));
    const int nv1 = has1 ? (int)max(0LL, min((long long)QAT_VEC, n - e1)) : 0;
    const RawVec x0 = load_vec(x, e0, nv0);
    RawVec x1;
    if (has1) x1 = load_vec(x, e1, nv1);
    if (KEYMODE == 1) {
      // both steps' parameters loaded together with x (a key per vector: one run of a channel or a
      // group), so the second step does not wait for its parameter load after the first is done
      long long r;
      const long long k0 = key_of(e0, inner, C, r);
      const long long k1 = has1 ? key_of(e1, inner, C, r) : k0;
      const float s0 = __ldg(scale + k0), z0 = __ldg(zp + k0);
      const float s1 = __ldg(scale + k1), z1 = __ldg(zp + k1);
      p.set(k0, s0, z0, qmin, qmax);
      fwd_one<VARIANT, KEYMODE, RMODE>(p, x0, y, mask, st0, e0, nv0, nwords, scale, zp, alpha, inner, C, qmin, qmax);
      if (has1) {
        p.set(k1, s1, z1, qmin, qmax);
        fwd_one<VARIANT, KEYMODE, RMODE>(p, x1, y, mask, st1, e1, nv1, nwords, scale, zp, alpha, inner, C, qmin, qmax);
      }
      continue;
    }
    fwd_one<VARIANT, KEYMODE, RMODE>(p, x0, y, mask, st0, e0, nv0, nwords, scale, zp, alpha, inner, C, qmin, qmax);
    if (has1)
      fwd_one<VARIANT, KEYMODE, RMODE>(p, x1, y, mask, st1, e1, nv1, nwords, scale, zp, alpha, inner, C, qmin, qmax);
  }
}

// One entry point per (variant, key mode), so each gets its own register allocation:
// fq_forward_<variant>_<keymode>, variant 0 STE (writes the mask), 1 LSQ, 2 PACT (key mode 0).
#define QAT_FWD_KERNEL(V, K)                                                                                   \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) fq_forward_##V##_##K(                                                  \
      const scalar_t* __restrict__ x, oscalar_t* __restrict__ y, unsigned* __restrict__ mask,                    \
      const float* __restrict__ scale, const float* __restrict__ zp, const float* __restrict__ alpha, long long n, \
      long long inner_d, unsigned inner_mul, int inner_shr, long long C_d, unsigned C_mul, int C_shr, float qmin,  \
      float qmax, int round_mode) {                                                                             \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    if (round_mode == 0) fwd_body<V, K, 0>(x, y, mask, scale, zp, alpha, n, inner, C, qmin, qmax);              \
    else if (round_mode == 1) fwd_body<V, K, 1>(x, y, mask, scale, zp, alpha, n, inner, C, qmin, qmax);         \
    else fwd_body<V, K, 2>(x, y, mask, scale, zp, alpha, n, inner, C, qmin, qmax);                              \
  }
QAT_FWD_KERNEL(0, 0)
QAT_FWD_KERNEL(0, 1)
QAT_FWD_KERNEL(0, 2)
QAT_FWD_KERNEL(0, 3)
QAT_FWD_KERNEL(1, 0)
QAT_FWD_KERNEL(1, 1)
QAT_FWD_KERNEL(1, 2)
QAT_FWD_KERNEL(1, 3)
QAT_FWD_KERNEL(2, 0)
#undef QAT_FWD_KERNEL

// ---------------------------------------------------------------- key mode 1 in tiles, 32-bit offsets
// fq_forward_t<T>_<variant>_1 (variants 0 STE, 1 LSQ): the key mode 1 forward launched as Inductor
// launches its pointwise kernels: every block owns one tile of W * T warp steps (W = blockDim.x / 32),
// issues all T loads of x and the T steps' parameters before any work, and exits: no grid-stride loop
// (the grid covers the tensor). Offsets, keys and the magic-number divisions are 32-bit, so the host
// launches it only for n < 2^31 (larger tensors take fq_forward_<variant>_1, 64-bit). Step t of the
// block's W warps are adjacent (Triton's blocked layout: load t of the block covers blockDim.x * QAT_VEC
// contiguous elements; a warp's T steps adjacent instead measured the same, v11).

// v / d for v < 2^31 with FastDiv's magic number (mul == 0: d == 1, the only such d below 2^31)
__device__ __forceinline__ unsigned fdiv32(unsigned v, unsigned mul, int shr) {
  return mul ? __umulhi(v, mul) >> shr : v;
}

// the mask word(s) of warp step `st` (write_mask with 32-bit indices)
__device__ __forceinline__ void write_mask32(unsigned* __restrict__ mask, unsigned st, unsigned bits, unsigned nwords) {
  const unsigned lane = threadIdx.x & 31u;
#if QAT_VEC == 1
  const unsigned w = __ballot_sync(QAT_FULL, bits);
  if (lane == 0 && st < nwords) mask[st] = w;
#else
  constexpr unsigned lanes_per_word = 32 / QAT_VEC;
  unsigned w = bits << ((lane % lanes_per_word) * QAT_VEC);
#pragma unroll
  for (int off = lanes_per_word / 2; off > 0; off >>= 1) w |= __shfl_xor_sync(QAT_FULL, w, off);
  const unsigned word = st * QAT_VEC + lane / lanes_per_word;
  if (lane % lanes_per_word == 0 && word < nwords) mask[word] = w;
#endif
}

// FULL: the block's tile lies inside the tensor (every block but the last), no bounds.
template <int VARIANT, int RMODE, int T, bool FULL>
__device__ __forceinline__ void fwd_tile_work(const scalar_t* __restrict__ x, oscalar_t* __restrict__ y,
                                              unsigned* __restrict__ mask, const float* __restrict__ scale,
                                              const float* __restrict__ zp, unsigned n, unsigned inner_d,
                                              unsigned inner_mul, int inner_shr, unsigned C_d, unsigned C_mul,
                                              int C_shr, float qmin, float qmax, unsigned st0, unsigned sstride) {
  constexpr unsigned kStep = 32u * QAT_VEC;  // elements of a warp step
  const unsigned lane = threadIdx.x & 31u;
  const unsigned e0 = st0 * kStep + lane * QAT_VEC;
  RawVec xv[T];
  int nv[T];
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const unsigned e = e0 + (unsigned)t * sstride * kStep;
    nv[t] = FULL ? QAT_VEC : (e < n ? (int)min((unsigned)QAT_VEC, n - e) : 0);
    xv[t] = load_vec(x, e, nv[t]);
  }
  // the steps' parameters, requested before any work (key 0 for vectors past the end: a valid address)
  float sv[T], zv[T];
  unsigned kv[T];
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const unsigned e = e0 + (unsigned)t * sstride * kStep;
    unsigned k = 0;
    if (FULL || nv[t] > 0) {
      const unsigned q = fdiv32(e, inner_mul, inner_shr);
      k = q - fdiv32(q, C_mul, C_shr) * C_d;
    }
    kv[t] = k;
    sv[t] = __ldg(scale + k);
    zv[t] = __ldg(zp + k);
  }
  const unsigned nwords = (n + 31u) >> 5;
  FwdParam<VARIANT> p;
  p.a = 0.0f;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const unsigned e = e0 + (unsigned)t * sstride * kStep;
    if (t == 0 || kv[t] != kv[t - 1]) {  // a run of one key (a channel) keeps its 1 / s
      p.s = sv[t];
      p.z = VARIANT == 1 ? qclamp(rintf(zv[t]), qmin, qmax) : zv[t];
      p.inv_s = 1.0f / p.s;
    }
    ORawVec yv;
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      bool inside;
      yv.s[j] = out_of(fwd_elem<VARIANT, RMODE>(p, to_f(xv[t].s[j]), qmin, qmax, inside));
      bits |= (unsigned)(inside && (FULL || j < nv[t])) << j;
    }
    store_ovec(y, e, FULL ? QAT_VEC : nv[t], yv);
    if (VARIANT == 0) write_mask32(mask, st0 + (unsigned)t * sstride, bits, nwords);
  }
}

template <int VARIANT, int RMODE, int T>
__device__ __forceinline__ void fwd_tile_body(const scalar_t* __restrict__ x, oscalar_t* __restrict__ y,
                                              unsigned* __restrict__ mask, const float* __restrict__ scale,
                                              const float* __restrict__ zp, unsigned n, unsigned inner_d,
                                              unsigned inner_mul, int inner_shr, unsigned C_d, unsigned C_mul,
                                              int C_shr, float qmin, float qmax) {
  const unsigned W = blockDim.x >> 5, w = threadIdx.x >> 5;
  const unsigned st0 = blockIdx.x * W * T + w;  // the warp's first step
  const unsigned sstride = W;
  // n < 2^31 and a tile is at most 256 * T * QAT_VEC elements, so these products stay below 2^32
  if ((blockIdx.x + 1) * W * T * 32u * QAT_VEC <= n)
    fwd_tile_work<VARIANT, RMODE, T, true>(x, y, mask, scale, zp, n, inner_d, inner_mul, inner_shr, C_d, C_mul, C_shr,
                                           qmin, qmax, st0, sstride);
  else
    fwd_tile_work<VARIANT, RMODE, T, false>(x, y, mask, scale, zp, n, inner_d, inner_mul, inner_shr, C_d, C_mul,
                                            C_shr, qmin, qmax, st0, sstride);
}

// Same arguments as fq_forward_<V>_<K> (alpha unused); the host guarantees 1 < C, inner % QAT_VEC == 0
// and n < 2^31.
#define QAT_FWD_TILE_KERNEL(V, T)                                                                              \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) fq_forward_t##T##_##V##_1(                        \
      const scalar_t* __restrict__ x, oscalar_t* __restrict__ y, unsigned* __restrict__ mask,                    \
      const float* __restrict__ scale, const float* __restrict__ zp, const float* __restrict__ alpha, long long n, \
      long long inner_d, unsigned inner_mul, int inner_shr, long long C_d, unsigned C_mul, int C_shr, float qmin,  \
      float qmax, int round_mode) {                                                                             \
    const unsigned n32 = (unsigned)n, id = (unsigned)inner_d, cd = (unsigned)C_d;                             \
    if (round_mode == 0)                                                                                        \
      fwd_tile_body<V, 0, T>(x, y, mask, scale, zp, n32, id, inner_mul, inner_shr, cd, C_mul, C_shr, qmin, qmax); \
    else if (round_mode == 1)                                                                                   \
      fwd_tile_body<V, 1, T>(x, y, mask, scale, zp, n32, id, inner_mul, inner_shr, cd, C_mul, C_shr, qmin, qmax); \
    else                                                                                                        \
      fwd_tile_body<V, 2, T>(x, y, mask, scale, zp, n32, id, inner_mul, inner_shr, cd, C_mul, C_shr, qmin, qmax); \
  }
QAT_FWD_TILE_KERNEL(0, 1)
QAT_FWD_TILE_KERNEL(0, 2)
QAT_FWD_TILE_KERNEL(0, 4)
QAT_FWD_TILE_KERNEL(1, 1)
QAT_FWD_TILE_KERNEL(1, 2)
QAT_FWD_TILE_KERNEL(1, 4)
#undef QAT_FWD_TILE_KERNEL

// Clipped-STE backward: dx = grad where the saved mask bit is set, else 0. A lane's QAT_VEC
// elements lie in one mask word (QAT_VEC divides 32 and e0 is a multiple of QAT_VEC). grad is in
// QAT_OTYPE (the forward's y), dx in QAT_DTYPE (x's): the cast autocast's backward would make, fused.
// Bytes: reads grad and numel/8 bytes of mask, writes dx.
struct GradMask {
  ORawVec g;
  unsigned w;
};

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
fq_backward(const oscalar_t* __restrict__ g, const unsigned* __restrict__ mask, scalar_t* __restrict__ dx, long long n) {
  const long long nthreads = (long long)gridDim.x * blockDim.x;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long nvec = (n + QAT_VEC - 1) / QAT_VEC;
  auto load = [&](long long v) {
    const long long e = v * QAT_VEC;
    GradMask r;
    r.g = load_ovec(g, e, (int)min((long long)QAT_VEC, n - e));
    r.w = __ldg(mask + (e >> 5)) >> (e & 31);
    return r;
  };
  auto work = [&](long long v, const GradMask& gm) {
    const long long e = v * QAT_VEC;
    RawVec d;
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
#if QAT_OTYPE == QAT_DTYPE
      d.s[j] = ((gm.w >> j) & 1u) ? gm.g.s[j] : scalar_zero();
#else
      d.s[j] = ((gm.w >> j) & 1u) ? from_f(to_fo(gm.g.s[j])) : scalar_zero();
#endif
    }
    store_vec(dx, e, (int)min((long long)QAT_VEC, n - e), d);
  };
  pipelined(tid, nthreads, nvec, load, work);
}

// Clipped-STE backward in place, for a gradient in x's own dtype that the caller owns: grad's
// elements whose mask bit is clear become 0, the others stay. One thread a mask word: reads numel/8
// bytes of mask and writes only the clipped elements (dynamic per-token ranges clip almost none), so
// the backward pass of an activation quantizer costs no pass over its gradient.
QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
fq_backward_inplace(scalar_t* __restrict__ g, const unsigned* __restrict__ mask, long long n) {
  const long long nwords = (n + 31) >> 5;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < nwords; w += stride) {
    const long long e0 = w << 5;
    unsigned cleared = ~__ldg(mask + w);
    if (n - e0 < 32) cleared &= (1u << (n - e0)) - 1u;  // the last word's bits past n
    while (cleared) {
      g[e0 + __ffs(cleared) - 1] = scalar_zero();
      cleared &= cleared - 1u;
    }
  }
}
