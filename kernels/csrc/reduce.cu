// Fake-quant kernels that reduce to the parameters while they stream the tensor:
//   LSQ / LSQ+ backward: dx, dscale, dzero_point in one pass;
//   PACT backward: dx and dalpha in one pass;
//   the observer's min/max per tensor / channel / group.
// Included after common.cuh. Two launch shapes share each operation (an `Op` below):
//
// seg:  each warp owns a contiguous range of warp steps (32 * QAT_VEC contiguous elements). A
//       lane's vector has one key (the host guarantees inner % QAT_VEC == 0, or C == 1) and keys form
//       contiguous runs within a step (C == 1 or C * inner >= 32 * QAT_VEC); see seg_body's three
//       modes (register accumulation for long runs, butterflies for short aligned runs, a segmented
//       scan otherwise).
// cols: the tensor seen as (rows, Wd = C * inner) with key = col / inner (inner == 1: channels on
//       the last axis, or tiny C * inner). A thread owns QAT_VEC columns of a slab of `colsv`
//       vectors and walks rows; the R threads of a block that share a column are summed in shared
//       memory, then one atomic per column and block.
// Bytes: reads x (and grad), writes dx; the parameters and their gradients are numel / inner-sized.
#include "common.cuh"

// ---------------------------------------------------------------- operations

// LSQ / LSQ+ (PyTorch's _fake_quantize_learnable_* gradients, element by element):
//   inside (qmin <= rnd(x/s)+z <= qmax): dx = g, ds = (x_hat - x) / s * g * f, dz = 0
//   below: dx = 0, ds = (qmin - z) * g * f, dz = -s * g * f;  above: qmax in place of qmin.
// z is used as clamp(rint(zero_point), qmin, qmax).
template <int RMODE>
struct LsqOp {
  static constexpr bool kGrad = true;
  static constexpr bool kDx = true;
  struct P {
    float s, z, inv_s;
  };
  const float* scale;
  const float* zp;
  float* ds;
  float* dz;
  float qmin, qmax, f;

  __device__ __forceinline__ P param(long long k) const {
    P p;
    p.s = __ldg(scale + k);
    p.z = qclamp(rintf(__ldg(zp + k)), qmin, qmax);
    p.inv_s = 1.0f / p.s;
    return p;
  }
  __device__ static __forceinline__ float ida() { return 0.0f; }
  __device__ static __forceinline__ float idb() { return 0.0f; }
  __device__ static __forceinline__ void comb(float& a, float& b, float oa, float ob) {
    a += oa;
    b += ob;
  }
  __device__ __forceinline__ bool elem(const P& p, float x, float g, float& a, float& b) const {
    const float qr = qround_t<RMODE>(x * p.inv_s) + p.z;
    const bool below = qr < qmin;
    const bool above = qr > qmax;
    const bool inside = !(below || above);
    float dsv, dzv;
    if (inside) {
      const float xh = (qr - p.z) * p.s;  // q == q_raw inside the range
      dsv = (xh - x) / p.s * g * f;
      dzv = 0.0f;
    } else {
      dsv = (below ? (qmin - p.z) * g : (qmax - p.z) * g) * f;
      dzv = -p.s * g * f;
    }
    a += dsv;
    b += dzv;
    return inside;
  }
  __device__ __forceinline__ void flush(long long k, float a, float b) const {
    atomicAdd(ds + k, a);
    atomicAdd(dz + k, b);
  }
  __device__ __forceinline__ void store(long long k, float a, float b) const {
    ds[k] = a;
    dz[k] = b;
  }
};

// PACT: dx = g on 0 <= x < alpha, dalpha = sum of g over x >= alpha (one alpha: C == 1).
struct PactOp {
  static constexpr bool kGrad = true;
  static constexpr bool kDx = true;
  struct P {
    float a;
  };
  const float* alpha;
  float* dalpha;

  __device__ __forceinline__ P param(long long) const {
    P p;
    p.a = __ldg(alpha);
    return p;
  }
  __device__ static __forceinline__ float ida() { return 0.0f; }
  __device__ static __forceinline__ float idb() { return 0.0f; }
  __device__ static __forceinline__ void comb(float& a, float& b, float oa, float ob) {
    a += oa;
    b += ob;
  }
  __device__ __forceinline__ bool elem(const P& p, float x, float g, float& a, float&) const {
    a += x >= p.a ? g : 0.0f;
    return (x >= 0.0f) && (x < p.a);
  }
  __device__ __forceinline__ void flush(long long, float a, float) const { atomicAdd(dalpha, a); }
  __device__ __forceinline__ void store(long long, float a, float) const { atomicAdd(dalpha, a); }
};

// Observer statistics: min and max per parameter (NaN ignored, as fminf / fmaxf do).
struct MinMaxOp {
  static constexpr bool kGrad = false;
  static constexpr bool kDx = false;
  struct P {};
  float* mn;
  float* mx;

  __device__ __forceinline__ P param(long long) const { return P(); }
  __device__ static __forceinline__ float ida() { return __int_as_float(0x7f800000); }   // +inf
  __device__ static __forceinline__ float idb() { return __int_as_float(0xff800000); }   // -inf
  __device__ static __forceinline__ void comb(float& a, float& b, float oa, float ob) {
    a = fminf(a, oa);
    b = fmaxf(b, ob);
  }
  __device__ __forceinline__ bool elem(const P&, float x, float, float& a, float& b) const {
    a = fminf(a, x);
    b = fmaxf(b, x);
    return true;
  }
  __device__ __forceinline__ void flush(long long k, float a, float b) const {
    atomic_min_f(mn + k, a);
    atomic_max_f(mx + k, b);
  }
  __device__ __forceinline__ void store(long long k, float a, float b) const {
    mn[k] = a;
    mx[k] = b;
  }
};

// ---------------------------------------------------------------- seg: runs of keys

// Work of one lane on one vector: dx, and the vector's partial (a, b); returns its key (-1 past the end).
template <class Op>
__device__ __forceinline__ long long seg_vec(const Op& op, const RawVec& xv, const RawVec& gv, scalar_t* __restrict__ dx,
                                             long long e0, int nv, const FastDiv& inner, const FastDiv& C, float& a,
                                             float& b) {
  a = Op::ida();
  b = Op::idb();
  if (nv <= 0) return -1;
  long long key = 0;
  if (C.d != 1) {
    long long r;
    key = key_of(e0, inner, C, r);
  }
  const typename Op::P p = op.param(key);
  RawVec d;
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j) {
    d.s[j] = scalar_zero();
    if (j < nv) {
      const bool keep = op.elem(p, to_f(xv.s[j]), Op::kGrad ? to_f(gv.s[j]) : 0.0f, a, b);
      if (Op::kDx && keep) d.s[j] = gv.s[j];
    }
  }
  if (Op::kDx) store_vec(dx, e0, nv, d);
  return key;
}

// Butterfly reduction within aligned groups of `width` lanes (a power of two): every lane gets its
// group's total.
template <class Op>
__device__ __forceinline__ void group_allreduce(float& a, float& b, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    const float oa = __shfl_xor_sync(QAT_FULL, a, off);
    const float ob = __shfl_xor_sync(QAT_FULL, b, off);
    Op::comb(a, b, oa, ob);
  }
}

// Segmented suffix reduction by key over the warp; the first lane of each run flushes the run's
// total, except runs whose key is `skip` (or < 0).
template <class Op>
__device__ __forceinline__ void seg_scan_flush(const Op& op, long long key, float a, float b, long long skip) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float oa = __shfl_down_sync(QAT_FULL, a, off);
    const float ob = __shfl_down_sync(QAT_FULL, b, off);
    const long long ok = __shfl_down_sync(QAT_FULL, key, off);
    if (lane + off < 32 && ok == key) Op::comb(a, b, oa, ob);
  }
  const long long prev = __shfl_up_sync(QAT_FULL, key, 1);
  const bool head = lane == 0 || prev != key;
  if (head && key >= 0 && key != skip) op.flush(key, a, b);
}

// Three ways to reduce a warp step, chosen by the host from the layout:
//   MODE 0 (long runs: per-tensor, or a key spans >= 4 steps): each lane accumulates in registers
//          while the whole warp stays on the current key (one vote a step); a step that crosses a
//          key boundary flushes the old key (butterfly + one atomic) and scans the step by key.
//   MODE 1 (short aligned runs: inner / QAT_VEC lanes, a power of two <= 32, e.g. groups of 32..256):
//          butterfly within each run, its first lane flushes (one atomic per run).
//   MODE 2 (anything else): segmented scan of every step, the last run carried to the next step.
// The warp's leftover (MODE 0 / 2) is combined across the block before its atomics.
template <class Op, int MODE>
__device__ __forceinline__ void seg_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ dx, long long n, const FastDiv& inner, const FastDiv& C,
                                         bool unique) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long step_elems = 32LL * QAT_VEC;
  const long long nsteps = (n + step_elems - 1) / step_elems;
  // each warp owns a contiguous range of steps, so a key's run stays in one warp for long
  const long long per = (nsteps + nwarps - 1) / nwarps;
  const long long s_begin = min(warp * per, nsteps);
  const long long s_end = min(s_begin + per, nsteps);
  const int run_lanes = (int)(inner.d / QAT_VEC);  // MODE 1 only

  long long tkey = -1;  // MODE 0: the warp's current key, MODE 2: the carried run's key
  float ta = Op::ida(), tb = Op::idb();

  auto step = [&](const RawVec& xv, const RawVec& gv, long long e0, int nv) {
    float a, b;
    const long long key = seg_vec(op, xv, gv, dx, e0, nv, inner, C, a, b);
    if (MODE == 0) {
      if (__all_sync(QAT_FULL, key == tkey)) {
        Op::comb(ta, tb, a, b);
        return;
      }
      if (tkey >= 0) {
        float ra = ta, rb = tb;
        group_allreduce<Op>(ra, rb, 32);
        if (lane == 0) op.flush(tkey, ra, rb);
      }
      const long long last = __shfl_sync(QAT_FULL, key, 31);
      if (key == last) {
        ta = a;
        tb = b;
        a = Op::ida();
        b = Op::idb();
      } else {
        ta = Op::ida();
        tb = Op::idb();
      }
      tkey = last;
      seg_scan_flush(op, key, a, b, last);
    } else if (MODE == 1) {
      group_allreduce<Op>(a, b, run_lanes);
      if ((lane & (run_lanes - 1)) == 0 && key >= 0) {
        if (unique) op.store(key, a, b);  // the only run of this key (no wrap): a plain store
        else op.flush(key, a, b);
      }
    } else {
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float oa = __shfl_down_sync(QAT_FULL, a, off);
        const float ob = __shfl_down_sync(QAT_FULL, b, off);
        const long long ok = __shfl_down_sync(QAT_FULL, key, off);
        if (lane + off < 32 && ok == key) Op::comb(a, b, oa, ob);
      }
      const long long prev = __shfl_up_sync(QAT_FULL, key, 1);
      const bool head = lane == 0 || prev != key;
      if (lane == 0) {
        if (key == tkey) Op::comb(a, b, ta, tb);
        else if (tkey >= 0) op.flush(tkey, ta, tb);
      }
      const unsigned heads = __ballot_sync(QAT_FULL, head);
      const int last = 31 - __clz(heads);
      if (head && lane != last && key >= 0) op.flush(key, a, b);
      ta = __shfl_sync(QAT_FULL, a, last);
      tb = __shfl_sync(QAT_FULL, b, last);
      tkey = __shfl_sync(QAT_FULL, key, last);
    }
  };

  for (long long st = s_begin; st < s_end; st += 2) {
    const bool has1 = st + 1 < s_end;  // warp-uniform
    const long long e0 = st * step_elems + (long long)lane * QAT_VEC;
    const long long e1 = e0 + step_elems;
    const int nv0 = (int)max(0LL, min((long long)QAT_VEC, n - e0));
    const int nv1 = has1 ? (int)max(0LL, min((long long)QAT_VEC, n - e1)) : 0;
    RawVec x0, g0, x1, g1;
    x0 = load_vec(x, e0, nv0);
    if (Op::kGrad) g0 = load_vec(g, e0, nv0);
    if (has1) {
      x1 = load_vec(x, e1, nv1);
      if (Op::kGrad) g1 = load_vec(g, e1, nv1);
    }
    step(x0, g0, e0, nv0);
    if (has1) step(x1, g1, e1, nv1);
  }

  if (MODE == 1) return;
  // the warp's leftover: MODE 0 holds per-lane partials, MODE 2 the carried total (same in all lanes)
  if (MODE == 0 && tkey >= 0) group_allreduce<Op>(ta, tb, 32);
  __shared__ long long s_key[QAT_THREADS / 32];
  __shared__ float s_a[QAT_THREADS / 32], s_b[QAT_THREADS / 32];
  const int w = threadIdx.x >> 5;
  if (lane == 0) {
    s_key[w] = tkey;
    s_a[w] = ta;
    s_b[w] = tb;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // neighbouring warps often share the key (per-tensor: always)
    long long ck = -1;
    float ca = Op::ida(), cb = Op::idb();
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) {
      const long long k = s_key[i];
      if (k < 0) continue;
      if (k == ck) {
        Op::comb(ca, cb, s_a[i], s_b[i]);
      } else {
        if (ck >= 0) op.flush(ck, ca, cb);
        ck = k;
        ca = s_a[i];
        cb = s_b[i];
      }
    }
    if (ck >= 0) op.flush(ck, ca, cb);
  }
}

// ---------------------------------------------------------------- cols: (rows, Wd), key = col / inner

struct XG {
  RawVec x, g;
};

template <class Op>
__device__ __forceinline__ void cols_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ dx, long long rows, long long Wd, long long inner,
                                          int colsv, int R) {
  extern __shared__ float sh[];  // 2 * blockDim.x * QAT_VEC floats
  const int tid = threadIdx.x;
  const int cv = tid % colsv;
  const int rr = tid / colsv;
  const long long Wdv = Wd / QAT_VEC;
  const long long colv = (long long)blockIdx.x * colsv + cv;
  const bool active = rr < R && colv < Wdv;
  const long long rows_per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = (long long)blockIdx.y * rows_per;
  const long long r1 = min(r0 + rows_per, rows);
  float a[QAT_VEC], b[QAT_VEC];
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j) {
    a[j] = Op::ida();
    b[j] = Op::idb();
  }
  if (active) {
    typename Op::P p[QAT_VEC];
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) p[j] = op.param((colv * QAT_VEC + j) / inner);
    auto load = [&](long long r) {
      const long long e = r * Wd + colv * QAT_VEC;
      XG v;
      v.x = load_vec(x, e, QAT_VEC);
      if (Op::kGrad) v.g = load_vec(g, e, QAT_VEC);
      return v;
    };
    auto work = [&](long long r, const XG& v) {
      const long long e = r * Wd + colv * QAT_VEC;
      RawVec d;
#pragma unroll
      for (int j = 0; j < QAT_VEC; ++j) {
        const bool keep = op.elem(p[j], to_f(v.x.s[j]), Op::kGrad ? to_f(v.g.s[j]) : 0.0f, a[j], b[j]);
        d.s[j] = (Op::kDx && keep) ? v.g.s[j] : scalar_zero();
      }
      if (Op::kDx) store_vec(dx, e, QAT_VEC, d);
    };
#if QAT_VEC >= 8
    // 8 columns' parameters already fill the registers: one row at a time (the software pipeline
    // pushed this to 121 registers and ran slower)
    for (long long r = r0 + rr; r < r1; r += R) work(r, load(r));
#else
    pipelined(r0 + rr, (long long)R, r1, load, work);
#endif
  }
  float* sa = sh;
  float* sb = sh + blockDim.x * QAT_VEC;
  if (rr < R) {
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      sa[(rr * colsv + cv) * QAT_VEC + j] = a[j];
      sb[(rr * colsv + cv) * QAT_VEC + j] = b[j];
    }
  }
  __syncthreads();
  if (rr == 0 && colv < Wdv) {
#pragma unroll
    for (int j = 0; j < QAT_VEC; ++j) {
      float aa = a[j], bb = b[j];
      for (int k = 1; k < R; ++k) Op::comb(aa, bb, sa[(k * colsv + cv) * QAT_VEC + j], sb[(k * colsv + cv) * QAT_VEC + j]);
      op.flush((colv * QAT_VEC + j) / inner, aa, bb);
    }
  }
}

// ---------------------------------------------------------------- entry points

// lsq_backward_seg<mode> / minmax_seg<mode>: one entry point per seg_body mode (own registers).
#define QAT_LSQ_SEG(M)                                                                                          \
  extern "C" __global__ void __launch_bounds__(QAT_THREADS, 4) lsq_backward_seg##M(                                \
      const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,                \
      const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long n,         \
      long long inner_d, unsigned inner_mul, int inner_shr, long long C_d, unsigned C_mul, int C_shr, int unique, \
      float qmin, float qmax, float f, int round_mode) {                                                        \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    if (round_mode == 0)                                                                                        \
      seg_body<LsqOp<0>, M>(LsqOp<0>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, n, inner, C, unique);       \
    else if (round_mode == 1)                                                                                   \
      seg_body<LsqOp<1>, M>(LsqOp<1>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, n, inner, C, unique);       \
    else                                                                                                        \
      seg_body<LsqOp<2>, M>(LsqOp<2>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, n, inner, C, unique);       \
  }
QAT_LSQ_SEG(0)
QAT_LSQ_SEG(1)
QAT_LSQ_SEG(2)
#undef QAT_LSQ_SEG

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
lsq_backward_cols(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long rows,
                  long long Wd, long long inner, int colsv, int R, float qmin, float qmax, float f, int round_mode) {
  if (round_mode == 0) cols_body(LsqOp<0>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else if (round_mode == 1) cols_body(LsqOp<1>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else cols_body(LsqOp<2>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
}

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
pact_backward_seg(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ alpha, float* dalpha, long long n) {
  const PactOp op{alpha, dalpha};
  const FastDiv inner{n > 0 ? n : 1, 0u, 0}, C{1, 0u, 0};
  seg_body<PactOp, 0>(op, x, g, dx, n, inner, C, false);
}

#define QAT_MINMAX_SEG(M)                                                                                       \
  extern "C" __global__ void __launch_bounds__(QAT_THREADS)                                                    \
      minmax_seg##M(const scalar_t* __restrict__ x, float* mn, float* mx, long long n, long long inner_d,       \
                    unsigned inner_mul, int inner_shr, long long C_d, unsigned C_mul, int C_shr, int unique) {   \
    const MinMaxOp op{mn, mx};                                                                                  \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    seg_body<MinMaxOp, M>(op, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, n, inner, C, unique);          \
  }
QAT_MINMAX_SEG(0)
QAT_MINMAX_SEG(1)
QAT_MINMAX_SEG(2)
#undef QAT_MINMAX_SEG

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
minmax_cols(const scalar_t* __restrict__ x, float* mn, float* mx, long long rows, long long Wd, long long inner,
            int colsv, int R) {
  const MinMaxOp op{mn, mx};
  cols_body(op, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, rows, Wd, inner, colsv, R);
}
