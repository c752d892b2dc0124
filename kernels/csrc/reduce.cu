// Fake-quant kernels that reduce to the parameters while they stream the tensor:
//   LSQ / LSQ+ backward: dx, dscale, dzero_point in one pass;
//   PACT backward: dx and dalpha in one pass;
//   the observer's min/max per tensor / channel / group.
// Included after common.cuh. Three launch shapes share each operation (an `Op` below):
//
// seg:  each warp owns a contiguous range of warp steps (32 * QAT_VEC contiguous elements). A
//       lane's vector has one key (the host guarantees inner % QAT_VEC == 0, or C == 1) and keys form
//       contiguous runs within a step (C == 1 or C * inner >= 32 * QAT_VEC); see seg_body's two
//       modes (register accumulation for long runs, a segmented scan otherwise).
// grp:  short aligned runs (a key's run is gv = inner / QAT_VEC vectors, gv = K * L with L a power of
//       two <= 32: per-group quantization, or channels with a small inner size): L lanes share a run,
//       each loading K of its vectors, so a warp reduces 32 / L runs at once with log2(L) butterfly
//       levels and K loads per lane in flight.
// cols: the tensor seen as (rows, Wd = C * inner) with key = col / inner (inner == 1: channels on
//       the last axis, or tiny C * inner). A thread owns QAT_VEC columns of a slab of `colsv`
//       vectors and walks rows, ROWS rows' loads in flight; the R threads of a block that share a
//       column are summed in shared memory, then one atomic per column and block.
// Bytes: reads x (and grad), writes dx; the parameters and their gradients are numel / inner-sized.
#include "common.cuh"

// ---------------------------------------------------------------- operations

// LSQ / LSQ+ (PyTorch's _fake_quantize_learnable_* gradients, element by element; reference.py):
//   v = x * inv_s, q_raw = rnd(v) + z
//   inside (qmin <= q_raw <= qmax): dx = g, ds = ((q_raw - z) - v) * g * f, dz = 0
//   below: dx = 0, ds = (qmin - z) * g * f, dz = -s * g * f;  above: qmax in place of qmin.
// z is used as clamp(rint(zero_point), qmin, qmax). The element loop sums a = t * g (t the bracket of
// ds) and b = g over the clipped elements; flush / store apply f and -s * f to those sums, so the loop
// needs neither s nor f (one multiply less per element, and two registers less per parameter).
template <int RMODE>
struct LsqOp {
  static constexpr bool kMinMax = false;
  static constexpr bool kGrad = true;
  static constexpr bool kDx = true;
  struct P {
    float z, inv_s;
  };
  const float* scale;
  const float* zp;
  float* ds;
  float* dz;
  float qmin, qmax, f;

  __device__ __forceinline__ P param(long long k) const {
    P p;
    p.z = qclamp(rintf(__ldg(zp + k)), qmin, qmax);
    p.inv_s = 1.0f / __ldg(scale + k);
    return p;
  }
  __device__ static __forceinline__ float ida() { return 0.0f; }
  __device__ static __forceinline__ float idb() { return 0.0f; }
  __device__ static __forceinline__ void comb(float& a, float& b, float oa, float ob) {
    a += oa;
    b += ob;
  }
  __device__ __forceinline__ bool elem(const P& p, float x, float g, float& a, float& b) const {
    const float v = x * p.inv_s;
    const float qr = qround_t<RMODE>(v) + p.z;
    const bool below = qr < qmin;
    const bool above = qr > qmax;
    const bool inside = !(below || above);
    const float t = inside ? (qr - p.z) - v : (below ? qmin : qmax) - p.z;
    a += t * g;
    b += inside ? 0.0f : g;
    return inside;
  }
  __device__ __forceinline__ void flush(long long k, float a, float b) const {
    atomicAdd(ds + k, a * f);
    atomicAdd(dz + k, -__ldg(scale + k) * b * f);
  }
  __device__ __forceinline__ void store(long long k, float a, float b) const {
    ds[k] = a * f;
    dz[k] = -__ldg(scale + k) * b * f;
  }
};

// PACT: dx = g on 0 <= x < alpha, dalpha = sum of g over x >= alpha (one alpha: C == 1).
struct PactOp {
  static constexpr bool kMinMax = false;
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
  static constexpr bool kMinMax = true;
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

// Tuning (qat.kernels.tuning.KernelTuning, rendered by its defines(); no defaults here):
//   QAT_SEG_STEPS_LSQ / _MM    seg kernels: warp steps a warp loads before working on them;
//   QAT_ROWS_U_LSQ / _MM       rows kernels: vectors a thread loads before working on them;
//   QAT_COLS_ROWS_LSQ / _MM    cols kernels: rows a thread loads before working on them;
//   QAT_COLSH_ROWS_LSQ / _MM   colsh kernels: the same;
//   QAT_LSQ_MINB               minimum resident blocks per SM of the LSQ seg, grp and rows kernels.
#if !defined(QAT_SEG_STEPS_LSQ) || !defined(QAT_SEG_STEPS_MM) || !defined(QAT_ROWS_U_LSQ) || !defined(QAT_ROWS_U_MM)
#error "reduce.cu: the seg / rows tuning macros are set by cupy_backend (KernelTuning.defines())"
#endif
#if !defined(QAT_COLS_ROWS_LSQ) || !defined(QAT_COLS_ROWS_MM) || !defined(QAT_COLSH_ROWS_LSQ) || !defined(QAT_COLSH_ROWS_MM)
#error "reduce.cu: the cols / colsh tuning macros are set by cupy_backend (KernelTuning.defines())"
#endif
#if !defined(QAT_LSQ_MINB)
#error "reduce.cu: QAT_LSQ_MINB is set by cupy_backend (KernelTuning.defines())"
#endif

// The parameters of the last key a lane saw (runs are long: reloaded only where the key changes).
template <class Op>
struct ParamCache {
  long long key;
  typename Op::P p;
  __device__ __forceinline__ const typename Op::P& get(const Op& op, long long k) {
    if (k != key) {
      key = k;
      p = op.param(k);
    }
    return p;
  }
};

// Work of one lane on one vector with parameters p: dx, and the vector's partial folded into (a, b).
template <class Op>
__device__ __forceinline__ void vec_work(const Op& op, const typename Op::P& p, const RawVec& xv, const RawVec& gv,
                                         scalar_t* __restrict__ dx, long long e0, int nv, float& a, float& b) {
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

// Work of one lane on one vector: dx, and the vector's partial (a, b); returns its key (-1 past the end).
template <class Op>
__device__ __forceinline__ long long seg_vec(const Op& op, ParamCache<Op>& pc, const RawVec& xv, const RawVec& gv,
                                             scalar_t* __restrict__ dx, long long e0, int nv, const FastDiv& inner,
                                             const FastDiv& C, float& a, float& b) {
  a = Op::ida();
  b = Op::idb();
  if (nv <= 0) return -1;
  long long key = 0;
  if (C.d != 1) {
    long long r;
    key = key_of(e0, inner, C, r);
  }
  vec_work(op, pc.get(op, key), xv, gv, dx, e0, nv, a, b);
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

// Segmented suffix reduction by key over the warp: afterwards the first lane of each run of equal
// keys holds the run's total in (a, b); returns whether this lane is such a first lane.
template <class Op>
__device__ __forceinline__ bool seg_scan(long long key, float& a, float& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float oa = __shfl_down_sync(QAT_FULL, a, off);
    const float ob = __shfl_down_sync(QAT_FULL, b, off);
    const long long ok = __shfl_down_sync(QAT_FULL, key, off);
    if (lane + off < 32 && ok == key) Op::comb(a, b, oa, ob);
  }
  const long long prev = __shfl_up_sync(QAT_FULL, key, 1);
  return lane == 0 || prev != key;
}

// seg_scan, then the first lane of each run flushes the run's total, except runs whose key is
// `skip` (or < 0).
template <class Op>
__device__ __forceinline__ void seg_scan_flush(const Op& op, long long key, float a, float b, long long skip) {
  const bool head = seg_scan<Op>(key, a, b);
  if (head && key >= 0 && key != skip) op.flush(key, a, b);
}

// Two ways to reduce a warp step, chosen by the host from the layout:
//   MODE 0 (long runs: per-tensor, or a key spans >= 4 steps): each lane accumulates in registers
//          while the whole warp stays on the current key (one vote a step); a step that crosses a
//          key boundary flushes the old key (butterfly + one atomic) and scans the step by key.
//   MODE 2 (anything else): segmented scan of every step, the last run carried to the next step.
// (Short aligned runs go to grp_body.) The warp's leftover is combined across the block before its
// atomics. STEPS steps are loaded before any is worked on.
//
// Which warp takes which step: the warps form teams of `wil` consecutive warps (wil divides the
// number of warps); each team owns a contiguous range of steps and its warps take every wil-th step
// of it. wil == 1: a warp's steps are contiguous (the longest key runs per warp); wil == all warps:
// a plain grid-stride loop. A wider team keeps the addresses in flight at any moment close together
// (DRAM pages stay open): on an H100 the per-warp ranges (thousands of streams at once) read 15-30%
// slower than the grid-stride loop of the element-wise kernels. The host picks the widest team that
// still leaves each warp a few steps per key.
template <class Op, int MODE, int STEPS>
__device__ __forceinline__ void seg_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ dx, long long n, const FastDiv& inner, const FastDiv& C,
                                         long long wil) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long step_elems = 32LL * QAT_VEC;
  const long long nsteps = (n + step_elems - 1) / step_elems;
  const long long nteams = nwarps / wil;
  const long long per = (nsteps + nteams - 1) / nteams;
  const long long s_begin = min((warp / wil) * per, nsteps);
  const long long s_end = min(s_begin + per, nsteps);
  const long long wi = warp % wil;

  ParamCache<Op> pc;
  pc.key = 0;
  pc.p = op.param(0);
  long long tkey = -1;  // MODE 0: the warp's current key, MODE 2: the carried run's key
  float ta = Op::ida(), tb = Op::idb();

  auto step = [&](const RawVec& xv, const RawVec& gv, long long e0, int nv) {
    float a, b;
    const long long key = seg_vec(op, pc, xv, gv, dx, e0, nv, inner, C, a, b);
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
    } else {
      const bool head = seg_scan<Op>(key, a, b);
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

  for (long long st0 = s_begin + wi; st0 < s_end; st0 += STEPS * wil) {
    RawVec xv[STEPS], gv[STEPS];
    int nv[STEPS];
#pragma unroll
    for (int u = 0; u < STEPS; ++u) {
      const long long st = st0 + u * wil;
      const long long e = st * step_elems + (long long)lane * QAT_VEC;
      nv[u] = st < s_end ? (int)max(0LL, min((long long)QAT_VEC, n - e)) : 0;
      if (st < s_end) {  // warp-uniform
        xv[u] = load_vec(x, e, nv[u]);
        if (Op::kGrad) gv[u] = load_vec(g, e, nv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < STEPS; ++u) {
      const long long st = st0 + u * wil;
      if (st >= s_end) break;
      step(xv[u], gv[u], st * step_elems + (long long)lane * QAT_VEC, nv[u]);
    }
  }

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

// ---------------------------------------------------------------- grp: short aligned runs

// A key's run is gv = inner / QAT_VEC vectors = K * L (L a power of two <= 32). A warp's unit of
// work is 32 * K vectors = 32 / L whole runs; lane (gi, sub) = (lane / L, lane % L) loads vectors
// sub, sub + L, ..., sub + (K-1) * L of run gi (each load instruction: 32 / L runs' L contiguous
// vectors), sums them in registers, then log2(L) butterfly levels give each run's total. `unique`:
// every key has one run (per-group), so the total is stored, not added. The run's parameters are
// loaded after its data (before it: 1.017 fp32, 1.009 16-bit, v9).
template <class Op, int K>
__device__ __forceinline__ void grp_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ dx, long long n, const FastDiv& inner, const FastDiv& C,
                                         bool unique) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int L = (int)(inner.d / QAT_VEC) / K;
  const int gi = lane / L, sub = lane & (L - 1);
  const long long unit = 32LL * K * QAT_VEC;  // elements of a warp's unit
  const long long nunits = (n + unit - 1) / unit;
  const long long run_off = (long long)gi * K * L * QAT_VEC + (long long)sub * QAT_VEC;
  for (long long t = warp; t < nunits; t += nwarps) {
    const long long e0 = t * unit + run_off;
    const long long head = t * unit + (long long)gi * K * L * QAT_VEC;  // the run's first element
    long long key = -1;
    if (head < n) {
      key = 0;
      if (C.d != 1) {
        long long r;
        key = key_of(head, inner, C, r);
      }
    }
    RawVec xv[K], gv[K];
    int nv[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const long long e = e0 + (long long)j * L * QAT_VEC;
      nv[j] = (int)max(0LL, min((long long)QAT_VEC, n - e));
      xv[j] = load_vec(x, e, nv[j]);
      if (Op::kGrad) gv[j] = load_vec(g, e, nv[j]);
    }
    float a = Op::ida(), b = Op::idb();
    if (key >= 0) {
      const typename Op::P p = op.param(key);
#pragma unroll
      for (int j = 0; j < K; ++j) vec_work(op, p, xv[j], gv[j], dx, e0 + (long long)j * L * QAT_VEC, nv[j], a, b);
    }
    group_allreduce<Op>(a, b, L);
    if (sub == 0 && key >= 0) {
      if (unique) op.store(key, a, b);
      else op.flush(key, a, b);
    }
  }
}

// ---------------------------------------------------------------- tile: grp's layout, one tile a block

// Inductor's persistent-reduction launch shape for the same short aligned runs (grp's layout with
// K = 1: a run is L = inner / QAT_VEC <= 32 vectors, each lane one vector of a run per load, a unit
// of 32 contiguous vectors = 32 / L whole runs): every block owns one tile of W * T consecutive units
// (W = blockDim.x / 32 warps, each T consecutive units; unit t of the W warps adjacent instead, Triton's
// blocked layout, measured 1.000-1.006, v12), issues all T loads of x (and grad) and then the T runs'
// parameters before any work (parameters at each run's work: 0.96-1.00 of that, v10), reduces each run
// with log2(L) butterfly levels, stores, and exits: no grid-stride loop (the grid covers the tensor).
// The T loads of a lane sit `ustep` units apart from one address.
// Per-group layouts only (C * inner == n: every key one run, stored, not added).
// FULL: the tile lies inside the tensor (every block but the last), no bounds.
template <class Op, int T, bool FULL>
__device__ __forceinline__ void tile_work(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ dx, long long n, const FastDiv& inner,
                                          const FastDiv& C, long long head0, int L, int sub, long long ustep) {
  const long long kStride = ustep * 32 * QAT_VEC;  // elements between a lane's consecutive runs
  const long long e0 = head0 + (long long)sub * QAT_VEC;
  const long long rstep = ustep * (32 / L);  // keys between a lane's consecutive runs
  // per-group (C * inner == n): run t's key is k0 + t * rstep, no wrap
  const long long k0 = (C.d != 1 && (FULL || head0 < n)) ? inner.div(head0) : 0;
  RawVec xv[T], gv[T];
  int nv[T];
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const long long e = e0 + (long long)t * kStride;
    nv[t] = FULL ? QAT_VEC : (int)max(0LL, min((long long)QAT_VEC, n - e));
    xv[t] = load_vec(x, e, nv[t]);
    if (Op::kGrad) gv[t] = load_vec(g, e, nv[t]);
  }
  typename Op::P p[T];
#pragma unroll
  for (int t = 0; t < T; ++t)
    if (FULL || head0 + (long long)t * kStride < n) p[t] = op.param(C.d != 1 ? k0 + (long long)t * rstep : 0);
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const bool valid = FULL || head0 + (long long)t * kStride < n;  // whole runs: the run's head decides
    const long long key = C.d != 1 ? k0 + (long long)t * rstep : 0;
    float a = Op::ida(), b = Op::idb();
    if (valid) vec_work(op, p[t], xv[t], gv[t], dx, e0 + (long long)t * kStride, nv[t], a, b);
    group_allreduce<Op>(a, b, L);
    if (sub == 0 && valid) op.store(key, a, b);
  }
}

template <class Op, int T>
__device__ __forceinline__ void tile_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ dx, long long n, const FastDiv& inner, const FastDiv& C) {
  const int lane = threadIdx.x & 31;
  const int L = (int)(inner.d / QAT_VEC);
  const int gi = lane / L, sub = lane & (L - 1);
  const long long w = threadIdx.x >> 5;
  const long long tile = (long long)blockDim.x * T * QAT_VEC;  // elements of a block's tile
  const long long ustep = 1;  // units between a lane's loads
  const long long head0 = (long long)blockIdx.x * tile + w * T * 32 * QAT_VEC +
                          (long long)gi * L * QAT_VEC;  // first element of the lane's first run
  if ((long long)(blockIdx.x + 1) * tile <= n)
    tile_work<Op, T, true>(op, x, g, dx, n, inner, C, head0, L, sub, ustep);
  else
    tile_work<Op, T, false>(op, x, g, dx, n, inner, C, head0, L, sub, ustep);
}

// ---------------------------------------------------------------- rows: long contiguous runs

// Block-wide reduction of (a, b): thread 0 gets the block's total. Ends with a barrier, so the
// shared scratch can be reused right after.
template <class Op>
__device__ __forceinline__ void block_reduce(float& a, float& b) {
  __shared__ float s_a[QAT_THREADS / 32], s_b[QAT_THREADS / 32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  group_allreduce<Op>(a, b, 32);
  if (lane == 0) {
    s_a[w] = a;
    s_b[w] = b;
  }
  __syncthreads();
  if (w == 0) {
    a = lane < (int)(blockDim.x >> 5) ? s_a[lane] : Op::ida();
    b = lane < (int)(blockDim.x >> 5) ? s_b[lane] : Op::idb();
    group_allreduce<Op>(a, b, 32);
  }
  __syncthreads();
}

// A key's run is one long contiguous row of innerv vectors (channels on axis 0 of a matrix, or any
// channel axis with a large inner size; the host guarantees inner % QAT_VEC == 0): row r has key
// r % C. One block per row (grid-stride over rows when there are more than blocks; several blocks a
// row with atomics, and a persistent grid, measured slower: v8). The block's threads stride through
// the row, U vectors (of x, and of grad) loaded per thread before any is worked on; a block reduction
// and a plain store (`store`: one row per key) or one atomic per block. No keys per element, no
// segment logic.
template <class Op, int U>
__device__ __forceinline__ void rows_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ dx, long long nrows, long long innerv, long long C,
                                          bool store) {
  for (long long row = blockIdx.x; row < nrows; row += gridDim.x) {
    const long long v0 = 0;
    const long long v1 = innerv;
    const long long key = C == 1 ? 0 : row % C;
    const scalar_t* __restrict__ xr = x + row * innerv * QAT_VEC;
    float a = Op::ida(), b = Op::idb();
    {
      const typename Op::P p = op.param(key);
      const scalar_t* __restrict__ gr = Op::kGrad ? g + row * innerv * QAT_VEC : g;
      scalar_t* __restrict__ dr = Op::kDx ? dx + row * innerv * QAT_VEC : dx;
      for (long long v = v0 + threadIdx.x; v < v1; v += (long long)U * QAT_THREADS) {
        RawVec xv[U], gv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v + u * QAT_THREADS < v1) {
            xv[u] = load_vec(xr, (v + u * QAT_THREADS) * QAT_VEC, QAT_VEC);
            if (Op::kGrad) gv[u] = load_vec(gr, (v + u * QAT_THREADS) * QAT_VEC, QAT_VEC);
          }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (v + u * QAT_THREADS < v1) vec_work(op, p, xv[u], gv[u], dr, (v + u * QAT_THREADS) * QAT_VEC, QAT_VEC, a, b);
      }
    }
    block_reduce<Op>(a, b);
    if (threadIdx.x == 0) {
      if (store) op.store(key, a, b);
      else op.flush(key, a, b);
    }
  }
}

// ---------------------------------------------------------------- cols: (rows, Wd), key = col / inner

struct XG {
  RawVec x, g;
};

template <class Op, int ROWS>
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
  // block row y owns a contiguous range of rows (interleaved groups of R rows, all blocks moving down
  // the tensor together, measured the same: v8)
  const long long rows_per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = (long long)blockIdx.y * rows_per;
  const long long r1 = min(r0 + rows_per, rows);
  const long long rstep = (long long)R;
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
    // ROWS rows' loads in flight before any is worked on (conditions uniform over the warp's row)
    for (long long r = r0 + rr; r < r1; r += rstep * ROWS) {
      XG v[ROWS];
#pragma unroll
      for (int u = 0; u < ROWS; ++u)
        if (r + u * rstep < r1) v[u] = load(r + u * rstep);
#pragma unroll
      for (int u = 0; u < ROWS; ++u)
        if (r + u * rstep < r1) work(r + u * rstep, v[u]);
    }
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

// ---------------------------------------------------------------- colsh: cols with half vectors

// cols_body with CV = QAT_VEC / 2 columns a thread (8-byte loads and stores where QAT_VEC > 1): half the
// parameters, sums and load registers of a thread, so more blocks fit on an SM (the 16-bit cols
// kernels hold 8 columns' parameters and sums in 95-111 registers, 2 blocks an SM). `colsv` and the
// column index count CV-element half vectors. Same reduction as cols_body (shared memory, then one
// atomic per column and block).
#define QAT_CV (QAT_VEC > 1 ? QAT_VEC / 2 : 1)
union HalfVec {
#if QAT_VEC > 1 && QAT_CV * QAT_ESIZE == 8
  uint2 u;
#endif
  scalar_t s[QAT_CV];
};
__device__ __forceinline__ HalfVec load_hvec(const scalar_t* __restrict__ p, long long e) {
  HalfVec r;
#if QAT_VEC > 1 && QAT_CV * QAT_ESIZE == 8
  r.u = __ldcs(reinterpret_cast<const uint2*>(p + e));
#else
#pragma unroll
  for (int j = 0; j < QAT_CV; ++j) r.s[j] = p[e + j];
#endif
  return r;
}
__device__ __forceinline__ void store_hvec(scalar_t* __restrict__ p, long long e, const HalfVec& r) {
#if QAT_VEC > 1 && QAT_CV * QAT_ESIZE == 8
  __stcs(reinterpret_cast<uint2*>(p + e), r.u);
#else
#pragma unroll
  for (int j = 0; j < QAT_CV; ++j) p[e + j] = r.s[j];
#endif
}

struct XGh {
  HalfVec x, g;
};

template <class Op, int ROWS>
__device__ __forceinline__ void colsh_body(const Op& op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                           scalar_t* __restrict__ dx, long long rows, long long Wd, long long inner,
                                           int colsv, int R) {
  constexpr int CV = QAT_CV;
  extern __shared__ float sh[];  // 2 * blockDim.x * CV floats
  const int tid = threadIdx.x;
  const int cv = tid % colsv;
  const int rr = tid / colsv;
  const long long Wdv = Wd / CV;
  const long long colv = (long long)blockIdx.x * colsv + cv;
  const bool active = rr < R && colv < Wdv;
  const long long rows_per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = (long long)blockIdx.y * rows_per;
  const long long r1 = min(r0 + rows_per, rows);
  const long long rstep = (long long)R;
  float a[CV], b[CV];
#pragma unroll
  for (int j = 0; j < CV; ++j) {
    a[j] = Op::ida();
    b[j] = Op::idb();
  }
  if (active) {
    typename Op::P p[CV];
#pragma unroll
    for (int j = 0; j < CV; ++j) p[j] = op.param((colv * CV + j) / inner);
    for (long long r = r0 + rr; r < r1; r += rstep * ROWS) {
      XGh v[ROWS];
#pragma unroll
      for (int u = 0; u < ROWS; ++u)
        if (r + u * rstep < r1) {
          const long long e = (r + u * rstep) * Wd + colv * CV;
          v[u].x = load_hvec(x, e);
          if (Op::kGrad) v[u].g = load_hvec(g, e);
        }
#pragma unroll
      for (int u = 0; u < ROWS; ++u)
        if (r + u * rstep < r1) {
          const long long e = (r + u * rstep) * Wd + colv * CV;
          HalfVec d;
#pragma unroll
          for (int j = 0; j < CV; ++j) {
            const bool keep = op.elem(p[j], to_f(v[u].x.s[j]), Op::kGrad ? to_f(v[u].g.s[j]) : 0.0f, a[j], b[j]);
            d.s[j] = (Op::kDx && keep) ? v[u].g.s[j] : scalar_zero();
          }
          if (Op::kDx) store_hvec(dx, e, d);
        }
    }
  }
  float* sa = sh;
  float* sb = sh + blockDim.x * CV;
  if (rr < R) {
#pragma unroll
    for (int j = 0; j < CV; ++j) {
      sa[(rr * colsv + cv) * CV + j] = a[j];
      sb[(rr * colsv + cv) * CV + j] = b[j];
    }
  }
  __syncthreads();
  if (rr == 0 && colv < Wdv) {
#pragma unroll
    for (int j = 0; j < CV; ++j) {
      float aa = a[j], bb = b[j];
      for (int k = 1; k < R; ++k) Op::comb(aa, bb, sa[(k * colsv + cv) * CV + j], sb[(k * colsv + cv) * CV + j]);
      op.flush((colv * CV + j) / inner, aa, bb);
    }
  }
}

// ---------------------------------------------------------------- entry points

// lsq_backward_seg<mode> / minmax_seg<mode>: one entry point per seg_body mode (own registers);
// lsq_backward_grp<K> / minmax_grp<K>: one per loads-per-lane K of grp_body (seg and grp share one
// argument list: `unique` is grp's, `wil` seg's);
// lsq_backward_tile<T> / minmax_tile<T>: one per loads-per-lane T of tile_body.
#define QAT_LSQ_HEAD                                                                                            \
  const scalar_t *__restrict__ x, const scalar_t *__restrict__ g, scalar_t *__restrict__ dx,                    \
      const float *__restrict__ scale, const float *__restrict__ zp, float *ds, float *dz, long long n,         \
      long long inner_d, unsigned inner_mul, int inner_shr, long long C_d, unsigned C_mul, int C_shr
#define QAT_LSQ_ARGS QAT_LSQ_HEAD, int unique, float qmin, float qmax, float f, int round_mode, long long wil
#define QAT_LSQ_TILE_ARGS QAT_LSQ_HEAD, float qmin, float qmax, float f, int round_mode
#define QAT_LSQ_DISPATCH(CALL)                                                                                  \
  const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                   \
  if (round_mode == 0) {                                                                                        \
    typedef LsqOp<0> OpT;                                                                                    \
    const OpT op{scale, zp, ds, dz, qmin, qmax, f};                                                            \
    CALL;                                                                                                       \
  } else if (round_mode == 1) {                                                                                 \
    typedef LsqOp<1> OpT;                                                                                    \
    const OpT op{scale, zp, ds, dz, qmin, qmax, f};                                                            \
    CALL;                                                                                                       \
  } else {                                                                                                      \
    typedef LsqOp<2> OpT;                                                                                    \
    const OpT op{scale, zp, ds, dz, qmin, qmax, f};                                                            \
    CALL;                                                                                                       \
  }
#define QAT_LSQ_SEG(M)                                                                                          \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS, QAT_LSQ_MINB) lsq_backward_seg##M(QAT_LSQ_ARGS) {      \
    QAT_LSQ_DISPATCH((seg_body<OpT, M, QAT_SEG_STEPS_LSQ>(op, x, g, dx, n, inner, C, wil)))                                    \
  }
#define QAT_LSQ_GRP(K)                                                                                          \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS, QAT_LSQ_MINB) lsq_backward_grp##K(QAT_LSQ_ARGS) {      \
    QAT_LSQ_DISPATCH((grp_body<OpT, K>(op, x, g, dx, n, inner, C, unique)))                            \
  }
QAT_LSQ_SEG(0)
QAT_LSQ_SEG(2)
QAT_LSQ_GRP(1)
QAT_LSQ_GRP(2)
QAT_LSQ_GRP(4)
QAT_LSQ_GRP(8)
#define QAT_LSQ_TILE(T)                                                                                         \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) lsq_backward_tile##T(QAT_LSQ_TILE_ARGS) {            \
    QAT_LSQ_DISPATCH((tile_body<OpT, T>(op, x, g, dx, n, inner, C)))                                              \
  }
QAT_LSQ_TILE(2)
QAT_LSQ_TILE(4)
QAT_LSQ_TILE(8)
#undef QAT_LSQ_SEG
#undef QAT_LSQ_GRP
#undef QAT_LSQ_TILE

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
lsq_backward_cols(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long rows,
                  long long Wd, long long inner, int colsv, int R, float qmin, float qmax, float f, int round_mode) {
  if (round_mode == 0)
    cols_body<LsqOp<0>, QAT_COLS_ROWS_LSQ>(LsqOp<0>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else if (round_mode == 1)
    cols_body<LsqOp<1>, QAT_COLS_ROWS_LSQ>(LsqOp<1>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else
    cols_body<LsqOp<2>, QAT_COLS_ROWS_LSQ>(LsqOp<2>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
lsq_backward_colsh(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                   const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long rows,
                   long long Wd, long long inner, int colsv, int R, float qmin, float qmax, float f, int round_mode) {
  if (round_mode == 0)
    colsh_body<LsqOp<0>, QAT_COLSH_ROWS_LSQ>(LsqOp<0>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else if (round_mode == 1)
    colsh_body<LsqOp<1>, QAT_COLSH_ROWS_LSQ>(LsqOp<1>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
  else
    colsh_body<LsqOp<2>, QAT_COLSH_ROWS_LSQ>(LsqOp<2>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, rows, Wd, inner, colsv, R);
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
pact_backward_seg(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ alpha, float* dalpha, long long n, long long wil) {
  const PactOp op{alpha, dalpha};
  const FastDiv inner{n > 0 ? n : 1, 0u, 0}, C{1, 0u, 0};
  seg_body<PactOp, 0, QAT_SEG_STEPS_LSQ>(op, x, g, dx, n, inner, C, wil);
}

#define QAT_MINMAX_HEAD                                                                                         \
  const scalar_t *__restrict__ x, float *mn, float *mx, long long n, long long inner_d, unsigned inner_mul,     \
      int inner_shr, long long C_d, unsigned C_mul, int C_shr
#define QAT_MINMAX_ARGS QAT_MINMAX_HEAD, int unique, long long wil
#define QAT_MINMAX_SEG(M)                                                                                       \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) minmax_seg##M(QAT_MINMAX_ARGS) {                     \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    seg_body<MinMaxOp, M, QAT_SEG_STEPS_MM>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, n, inner, C, wil); \
  }
#define QAT_MINMAX_GRP(K)                                                                                       \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) minmax_grp##K(QAT_MINMAX_ARGS) {                     \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    grp_body<MinMaxOp, K>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, n, inner, C, unique); \
  }
QAT_MINMAX_SEG(0)
QAT_MINMAX_SEG(2)
QAT_MINMAX_GRP(1)
QAT_MINMAX_GRP(2)
QAT_MINMAX_GRP(4)
QAT_MINMAX_GRP(8)
#define QAT_MINMAX_TILE(T)                                                                                      \
  QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS) minmax_tile##T(QAT_MINMAX_HEAD) {                    \
    const FastDiv inner{inner_d, inner_mul, inner_shr}, C{C_d, C_mul, C_shr};                                 \
    tile_body<MinMaxOp, T>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, n, inner, C);    \
  }
QAT_MINMAX_TILE(2)
QAT_MINMAX_TILE(4)
QAT_MINMAX_TILE(8)
#undef QAT_MINMAX_SEG
#undef QAT_MINMAX_GRP
#undef QAT_MINMAX_TILE

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
minmax_cols(const scalar_t* __restrict__ x, float* mn, float* mx, long long rows, long long Wd, long long inner,
            int colsv, int R) {
  cols_body<MinMaxOp, QAT_COLS_ROWS_MM>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, rows, Wd,
                                        inner, colsv, R);
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
minmax_colsh(const scalar_t* __restrict__ x, float* mn, float* mx, long long rows, long long Wd, long long inner,
             int colsv, int R) {
  colsh_body<MinMaxOp, QAT_COLSH_ROWS_MM>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, rows, Wd,
                                          inner, colsv, R);
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS)
minmax_rows(const scalar_t* __restrict__ x, float* mn, float* mx, long long nrows, long long innerv, long long C,
            int store) {
  rows_body<MinMaxOp, QAT_ROWS_U_MM>(MinMaxOp{mn, mx}, x, (const scalar_t*)nullptr, (scalar_t*)nullptr, nrows, innerv,
                                     C, store != 0);
}

QAT_ENTRY __global__ void __launch_bounds__(QAT_THREADS, QAT_LSQ_MINB)
lsq_backward_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                  const float* __restrict__ scale, const float* __restrict__ zp, float* ds, float* dz, long long nrows,
                  long long innerv, long long C, int store, float qmin, float qmax, float f, int round_mode) {
#define QAT_LSQ_ROWS(M)                                                                                         \
  rows_body<LsqOp<M>, QAT_ROWS_U_LSQ>(LsqOp<M>{scale, zp, ds, dz, qmin, qmax, f}, x, g, dx, nrows, innerv, C,      \
                                      store != 0)
  if (round_mode == 0) QAT_LSQ_ROWS(0);
  else if (round_mode == 1) QAT_LSQ_ROWS(1);
  else QAT_LSQ_ROWS(2);
#undef QAT_LSQ_ROWS
}
