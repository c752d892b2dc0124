// Fake-quant kernels that reduce to the parameters while they stream the tensor:
//   LSQ / LSQ+ backward: dx, dscale, dzero_point in one pass;
//   PACT backward: dx and dalpha in one pass;
//   the observer's min/max per tensor / channel / group.
// Included after common.cuh. Two launch shapes share each operation (an `Op` below):
//
// seg:  warps take warp steps (32 * QAT_VEC contiguous elements) grid-stride. A lane's
//       vector has one key (the host guarantees inner % QAT_VEC == 0, or C == 1), keys form
//       contiguous runs within a step (C == 1 or C * inner >= 32 * QAT_VEC), so a segmented
//       suffix reduction by key (5 shuffle rounds) leaves each run's total in its first lane. The
//       last run of a step is carried in registers into the warp's next step and merged when the key
//       is the same, so per-tensor costs one atomic per warp, a group one atomic per group.
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
  int round_mode;

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
    const float qr = qround(x * p.inv_s, round_mode) + p.z;
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
};

// ---------------------------------------------------------------- seg: runs of keys

template <class Op>
__device__ __forceinline__ void seg_step(const Op& op, const RawVec& xv, const RawVec& gv, scalar_t* __restrict__ dx,
                                         long long e0, int nv, long long inner, long long C, long long& carry_key,
                                         float& ca, float& cb) {
  const int lane = threadIdx.x & 31;
  float a = Op::ida(), b = Op::idb();
  long long key = -1;
  if (nv > 0) {
    if (C == 1) {
      key = 0;
    } else {
      long long q, r;
      divmod64(e0, inner, q, r);
      divmod64(q, C, r, key);
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
  }
  // Segmented suffix reduction: afterwards the first lane of each run holds the run's total.
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
    if (key == carry_key) Op::comb(a, b, ca, cb);
    else if (carry_key >= 0) op.flush(carry_key, ca, cb);
  }
  const unsigned heads = __ballot_sync(QAT_FULL, head);
  const int last = 31 - __clz(heads);
  if (head && lane != last && key >= 0) op.flush(key, a, b);
  ca = __shfl_sync(QAT_FULL, a, last);
  cb = __shfl_sync(QAT_FULL, b, last);
  carry_key = __shfl_sync(QAT_FULL, key, last);
}

struct XG {
  RawVec x, g;
};

template <class Op>
__device__ __forceinline__ void seg_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ dx, long long n, long long inner, long long C) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long step_elems = 32LL * QAT_VEC;
  const long long nsteps = (n + step_elems - 1) / step_elems;
  long long carry_key = -1;
  float ca = Op::ida(), cb = Op::idb();
  auto load = [&](long long st) {
    const long long e = st * step_elems + (long long)lane * QAT_VEC;
    const int nv = (int)max(0LL, min((long long)QAT_VEC, n - e));
    XG r;
    r.x = load_vec(x, e, nv);
    if (Op::kGrad) r.g = load_vec(g, e, nv);
    return r;
  };
  auto work = [&](long long st, const XG& v) {
    const long long e = st * step_elems + (long long)lane * QAT_VEC;
    const int nv = (int)max(0LL, min((long long)QAT_VEC, n - e));
    seg_step(op, v.x, v.g, dx, e, nv, inner, C, carry_key, ca, cb);
  };
  // Grid-stride over warp steps (all warps sweep the tensor together); a warp's partial sums for
  // one key are carried from step to step while the key stays the same.
  pipelined(warp, nwarps, nsteps, load, work);
  if (lane == 0 && carry_key >= 0) op.flush(carry_key, ca, cb);
}

// ---------------------------------------------------------------- cols: (rows, Wd), key = col / inner

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
    pipelined(r0 + rr, (long long)R, r1, load, work);
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

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
lsq_backward_seg(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                 const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long n,
                 long long inner, long long C, float qmin, float qmax, float f, int round_mode) {
  const LsqOp op{scale, zp, ds, dz, qmin, qmax, f, round_mode};
  seg_body(op, x, g, dx, n, inner, C);
}

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
lsq_backward_cols(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long rows,
                  long long Wd, long long inner, int colsv, int R, float qmin, float qmax, float f, int round_mode) {
  const LsqOp op{scale, zp, ds, dz, qmin, qmax, f, round_mode};
  cols_body(op, x, g, dx, rows, Wd, inner, colsv, R);
}

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
pact_backward_seg(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ alpha, float* dalpha, long long n) {
  const PactOp op{alpha, dalpha};
  seg_body(op, x, g, dx, n, n > 0 ? n : 1, 1);
}

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
minmax_seg(const scalar_t* __restrict__ x, float* mn, float* mx, long long n, long long inner, long long C) {
  const MinMaxOp op{mn, mx};
  seg_body(op, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, n, inner, C);
}

extern "C" __global__ void __launch_bounds__(QAT_THREADS)
minmax_cols(const scalar_t* __restrict__ x, float* mn, float* mx, long long rows, long long Wd, long long inner,
            int colsv, int R) {
  const MinMaxOp op{mn, mx};
  cols_body(op, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, rows, Wd, inner, colsv, R);
}
