// Shared device helpers of the fake-quant kernels (included textually by cupy_backend.py).
//
// Compile-time configuration, all of it from the host (cupy_backend._options): one module per
// (dtype, vector width, tuning); these sources keep no defaults of their own, a missing define is an
// #error. Here:
//   QAT_DTYPE    0 = float32, 1 = float16, 2 = bfloat16 (storage of x, y, grad, dx);
//   QAT_OTYPE    the same codes: storage of y (forwards) and grad (fq_backward) where it differs from
//                x's (fake_quant.cu, rows.cu; QAT_DTYPE for the other sources);
//   QAT_VEC      elements per thread per access: 16 bytes' worth (4 fp32 / 8 half) when every
//                pointer is 16-byte aligned, else 1;
//   QAT_THREADS  threads of a block (cupy_backend._THREADS);
// and in reduce.cu the tuning macros that qat.kernels.tuning.KernelTuning.defines() renders.
// Scales, zero points and all arithmetic are float32. The half types are carried as their raw 16
// bits and converted with PTX `cvt` (round to nearest even, as torch's .to()), so no CUDA header
// is needed and NVRTC compiles these sources without a GPU.
//
// Index rule of every kernel: element i of the contiguous tensor uses parameter
//   key = (i / inner) % C
// per-tensor: C = 1; per-channel along axis a: C = shape[a], inner = prod(shape[a+1:]);
// per-group of g along the last axis: C = numel / g, inner = g. Indices are 64-bit.
#pragma once

// Every kernel entry point is a template that nothing in the sources instantiates: NVRTC compiles
// only the entries the host names (cupy_backend: name expression "<kernel><0>"), so the first use of
// one kernel costs its own code generation, not that of every kernel in its file (parsing a file is
// ~20 ms; code generation is nearly all of a compile, ~0.3 s a kernel on 2 cores).
#define QAT_ENTRY template <int QatEntry = 0>

#if !defined(QAT_DTYPE) || !defined(QAT_OTYPE) || !defined(QAT_VEC) || !defined(QAT_THREADS)
#error "QAT_DTYPE, QAT_OTYPE, QAT_VEC and QAT_THREADS are set by cupy_backend (-D options)"
#endif

// Storage and float32 conversions of each dtype code.
template <int CODE>
struct Storage {
  typedef unsigned short type;  // float16 / bfloat16: the raw 16 bits
};
template <>
struct Storage<0> {
  typedef float type;
};
template <int CODE>
__device__ __forceinline__ float cvt_to_f(typename Storage<CODE>::type v);
template <>
__device__ __forceinline__ float cvt_to_f<0>(float v) { return v; }
template <>
__device__ __forceinline__ float cvt_to_f<1>(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
template <>
__device__ __forceinline__ float cvt_to_f<2>(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }
template <int CODE>
__device__ __forceinline__ typename Storage<CODE>::type cvt_from_f(float f);
template <>
__device__ __forceinline__ float cvt_from_f<0>(float f) { return f; }
template <>
__device__ __forceinline__ unsigned short cvt_from_f<1>(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
template <>
__device__ __forceinline__ unsigned short cvt_from_f<2>(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

#if QAT_DTYPE < 0 || QAT_DTYPE > 2 || QAT_OTYPE < 0 || QAT_OTYPE > 2
#error "QAT_DTYPE and QAT_OTYPE must be 0 (float32), 1 (float16) or 2 (bfloat16)"
#endif
typedef Storage<QAT_DTYPE>::type scalar_t;
#define QAT_ESIZE (QAT_DTYPE == 0 ? 4 : 2)
__device__ __forceinline__ float to_f(scalar_t v) { return cvt_to_f<QAT_DTYPE>(v); }
__device__ __forceinline__ scalar_t from_f(float v) { return cvt_from_f<QAT_DTYPE>(v); }
__device__ __forceinline__ scalar_t scalar_zero() { return (scalar_t)0; }

// The other streamed tensor (QAT_OTYPE): y of a forward and grad of the STE backward, in the dtype the
// layer computes in when it differs from x's (autocast: a float32 x whose fake-quantized copy feeds a
// bfloat16 matmul is written in bfloat16, as autocast would cast it). Its element is at most x's size.
typedef Storage<QAT_OTYPE>::type oscalar_t;
#define QAT_OESIZE (QAT_OTYPE == 0 ? 4 : 2)
#if QAT_OESIZE > QAT_ESIZE
#error "QAT_OTYPE's element must not be wider than QAT_DTYPE's"
#endif
__device__ __forceinline__ float to_fo(oscalar_t v) { return cvt_to_f<QAT_OTYPE>(v); }
__device__ __forceinline__ oscalar_t from_fo(float v) { return cvt_from_f<QAT_OTYPE>(v); }
// a forward's float32 result as y stores it: x's dtype first, then y's (what casting the result does)
__device__ __forceinline__ oscalar_t out_of(float v) {
#if QAT_DTYPE == 0 || QAT_OTYPE == QAT_DTYPE
  return from_fo(v);
#else
  return from_fo(to_f(from_f(v)));
#endif
}

#define QAT_VEC_BYTES (QAT_VEC * QAT_ESIZE)
#if QAT_VEC_BYTES != 16 && QAT_VEC != 1
#error "QAT_VEC must be 1 or 16 / sizeof(scalar_t)"
#endif

#define QAT_FULL 0xffffffffu

// The streamed tensors' 16-byte (and colsh's 8-byte) loads and stores carry cache-streaming hints
// (__ldcs / __stcs: ld.global.cs / st.global.cs, evict first): plain loads through the read-only path
// measured no better (v9: class means 1.000 fp32, 0.997 16-bit).

// One thread's slice: QAT_VEC consecutive elements, loaded with one 16-byte access when vectorized.
union RawVec {
#if QAT_VEC_BYTES == 16
  uint4 u;
#endif
  scalar_t s[QAT_VEC];
};

// Load the vector starting at element e; `nvalid` < QAT_VEC only at the tail (elements past the end
// read as 0 and must be ignored by the caller).
__device__ __forceinline__ RawVec load_vec(const scalar_t* __restrict__ p, long long e, int nvalid) {
  RawVec r;
#if QAT_VEC_BYTES == 16
  if (nvalid == QAT_VEC) {
    r.u = __ldcs(reinterpret_cast<const uint4*>(p + e));  // streamed once
    return r;
  }
#endif
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j) r.s[j] = j < nvalid ? p[e + j] : scalar_zero();
  return r;
}

__device__ __forceinline__ void store_vec(scalar_t* __restrict__ p, long long e, int nvalid, const RawVec& r) {
#if QAT_VEC_BYTES == 16
  if (nvalid == QAT_VEC) {
    __stcs(reinterpret_cast<uint4*>(p + e), r.u);
    return;
  }
#endif
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j)
    if (j < nvalid) p[e + j] = r.s[j];
}

// One thread's slice of the other streamed tensor: QAT_VEC elements of oscalar_t (16 or 8 bytes when
// vectorized).
#define QAT_OVEC_BYTES (QAT_VEC * QAT_OESIZE)
union ORawVec {
#if QAT_VEC > 1 && QAT_OVEC_BYTES == 16
  uint4 u;
#elif QAT_VEC > 1 && QAT_OVEC_BYTES == 8
  uint2 u;
#endif
  oscalar_t s[QAT_VEC];
};

__device__ __forceinline__ ORawVec load_ovec(const oscalar_t* __restrict__ p, long long e, int nvalid) {
  ORawVec r;
#if QAT_VEC > 1
  if (nvalid == QAT_VEC) {
    r.u = __ldcs(reinterpret_cast<const decltype(r.u)*>(p + e));
    return r;
  }
#endif
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j) r.s[j] = j < nvalid ? p[e + j] : (oscalar_t)0;
  return r;
}

__device__ __forceinline__ void store_ovec(oscalar_t* __restrict__ p, long long e, int nvalid, const ORawVec& r) {
#if QAT_VEC > 1
  if (nvalid == QAT_VEC) {
    __stcs(reinterpret_cast<decltype(r.u)*>(p + e), r.u);
    return;
  }
#endif
#pragma unroll
  for (int j = 0; j < QAT_VEC; ++j)
    if (j < nvalid) p[e + j] = r.s[j];
}

// QAT_VEC float32 parameters starting at p (16-byte aligned when QAT_VEC > 1).
__device__ __forceinline__ void load_params(const float* __restrict__ p, float (&out)[QAT_VEC]) {
#if QAT_VEC == 1
  out[0] = __ldg(p);
#else
#pragma unroll
  for (int i = 0; i < QAT_VEC / 4; ++i) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p) + i);
    out[4 * i] = t.x;
    out[4 * i + 1] = t.y;
    out[4 * i + 2] = t.z;
    out[4 * i + 3] = t.w;
  }
#endif
}

// 64-bit divide with a 32-bit fast path (the common case: both operands below 2^32).
__device__ __forceinline__ void divmod64(long long a, long long b, long long& q, long long& r) {
  if ((((unsigned long long)a) | ((unsigned long long)b)) >> 32 == 0) {
    unsigned qa = (unsigned)a / (unsigned)b;
    q = qa;
    r = (long long)((unsigned)a - qa * (unsigned)b);
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// Division by a run-time constant d with a host-computed magic number (mul, shr): for n < 2^31,
// n / d = umulhi(n, mul) >> shr (two instructions instead of a ~20-instruction integer divide);
// larger n take the 64-bit path. mul == 0 means d == 1 (or no magic number).
struct FastDiv {
  long long d;
  unsigned mul;
  int shr;
  __device__ __forceinline__ long long div(long long n) const {
    if (d == 1) return n;
    if (mul != 0u && n < 2147483648LL) return (long long)(__umulhi((unsigned)n, mul) >> shr);
    long long q, r;
    divmod64(n, d, q, r);
    return q;
  }
};

// key = (e / inner) % C, and r = e % inner
__device__ __forceinline__ long long key_of(long long e, const FastDiv& inner, const FastDiv& C, long long& r) {
  const long long q = inner.div(e);
  r = e - q * inner.d;
  return q - C.div(q) * C.d;
}

// Walks the parameter index key = (i / inner) % C along consecutive elements without dividing.
struct KeyIter {
  long long r, key, inner, C;
  __device__ __forceinline__ void init(long long e, const FastDiv& inner_, const FastDiv& C_) {
    inner = inner_.d;
    C = C_.d;
    key = key_of(e, inner_, C_, r);
  }
  __device__ __forceinline__ void next() {
    if (++r == inner) {
      r = 0;
      if (++key == C) key = 0;
    }
  }
};

// Rounding of v = x * inv_s, exactly as qat.spec.round_with_mode (torch ops, float32):
//   0 half_even: torch.round       -> rintf
//   1 half_away: sign(v) * floor(|v| + 0.5)
//   2 half_up:   floor(v + 0.5)
// Sources are compiled with --fmad=false, so v + 0.5f is a rounded add, as in PyTorch.
__device__ __forceinline__ float qround(float v, int mode) {
  if (mode == 0) return rintf(v);
  if (mode == 1) {
    const float sg = (float)((v > 0.0f) - (v < 0.0f));
    return sg * floorf(fabsf(v) + 0.5f);
  }
  return floorf(v + 0.5f);
}

// Compile-time rounding mode (same three modes), so the element loops carry no mode switch.
template <int MODE>
__device__ __forceinline__ float qround_t(float v) {
  if (MODE == 0) return rintf(v);
  if (MODE == 1) {
    const float sg = (float)((v > 0.0f) - (v < 0.0f));
    return sg * floorf(fabsf(v) + 0.5f);
  }
  return floorf(v + 0.5f);
}

// torch.clamp(q, qmin, qmax): NaN stays NaN (fminf/fmaxf would drop it); PTX max/min.NaN (sm_80+)
// do it in two instructions.
__device__ __forceinline__ float qclamp(float q, float qmin, float qmax) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(q), "f"(qmin));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(r), "f"(qmax));
  return r;
}

// Float atomics for min/max (the observer): order-preserving integer views of float32.
__device__ __forceinline__ void atomic_min_f(float* addr, float v) {
  if (v != v) return;
  if (__float_as_int(v) >= 0) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* addr, float v) {
  if (v != v) return;
  if (__float_as_int(v) >= 0) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}

// Software pipeline over a strided sequence of steps first, first + stride, ... < nsteps, two steps a
// stage: the loads of the next stage are issued before the current stage is worked on, so a thread
// always has memory requests in flight. `load(step)` returns what `work(step, loaded)` consumes.
// The loop conditions depend only on (first, stride), so they are warp-uniform when first is a
// warp index (the warp shuffles inside `work` need that).
template <class Load, class Work>
__device__ __forceinline__ void pipelined(long long first, long long stride, long long nsteps, const Load& load,
                                          const Work& work) {
  using V = decltype(load(0LL));
  V a0, a1;
  long long st = first;
  if (st < nsteps) a0 = load(st);
  if (st + stride < nsteps) a1 = load(st + stride);
  while (st < nsteps) {
    const long long nx = st + 2 * stride;
    V b0, b1;
    if (nx < nsteps) b0 = load(nx);
    if (nx + stride < nsteps) b1 = load(nx + stride);
    work(st, a0);
    if (st + stride < nsteps) work(st + stride, a1);
    a0 = b0;
    a1 = b1;
    st = nx;
  }
}
