// Compiled CPU kernels of sparse execution (fastsparse/core/native.py builds and loads this file).
//
// Two products of a CSR matrix A (rows r0..r1 only, so that the caller can split the rows over
// threads) with a dense row-major matrix of N columns:
//
//   spmm:  out[i, :] = bias[i] + sum_p val[v(p)] * B[col[p], :]     v(p) = perm ? perm[p] : p
//   sddmm: out[p]    = dot(G[i, :], X[col[p], :])                    for every p of row i
//
// spmm keeps a row's output chunk (up to 128 floats) in vector registers while it walks the
// row's nonzeros, and stores it once; sddmm keeps G's row chunk in registers and takes one dot
// product per nonzero. Both walk one chunk of columns over all of a thread's rows before the
// next chunk, so that for a wide N (many tokens, im2col) the chunk of B or X stays in cache. `perm` lets the input gradient read W's values in the CSR order of W^T
// without gathering them first. Each output element is summed by one thread in a fixed order, so
// a result does not depend on the number of threads.
//
// The instruction set is chosen at run time (AVX-512F, AVX2 with FMA, or portable C++): the
// library is compiled without -march flags, so one build runs on any x86-64 machine.
#include <cstdint>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FS_X86 1
#define FS_AVX512 __attribute__((target("avx512f")))
#define FS_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace {

// ---------------------------------------------------------------- portable C++
template <typename I, bool P>
void spmm_plain(const I* crow, const I* col, const float* val, const I* perm, const float* B,
                const float* bias, float* out, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    float* o = out + i * N;
    const float b = bias ? bias[i] : 0.f;
    for (int64_t j = 0; j < N; ++j) o[j] = b;
    for (int64_t p = crow[i]; p < (int64_t)crow[i + 1]; ++p) {
      const float v = val[P ? (int64_t)perm[p] : p];
      const float* br = B + (int64_t)col[p] * N;
      for (int64_t j = 0; j < N; ++j) o[j] += v * br[j];
    }
  }
}

template <typename I>
void sddmm_plain(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N,
                 int64_t r0, int64_t r1, bool acc) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* g = G + i * N;
    for (int64_t p = crow[i]; p < (int64_t)crow[i + 1]; ++p) {
      const float* x = X + (int64_t)col[p] * N;
      float s = 0.f;
      for (int64_t j = 0; j < N; ++j) s += g[j] * x[j];
      out[p] = acc ? out[p] + s : s;
    }
  }
}

#ifdef FS_X86
// ---------------------------------------------------------------- AVX-512F (16 floats a vector)
template <typename I, bool P, int R>
FS_AVX512 inline void spmm512_chunk(const I* col, const float* val, const I* perm, int64_t p0, int64_t p1,
                                    const float* B, int64_t N, int64_t j0, float b, float* o) {
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_ps(b);
  for (int64_t p = p0; p < p1; ++p) {
    if (p + 4 < p1) {
      const float* nb = B + (int64_t)col[p + 4] * N + j0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(nb + 16 * r), _MM_HINT_T0);
    }
    if (P && p + 16 < p1) _mm_prefetch((const char*)(val + perm[p + 16]), _MM_HINT_T0);
    const __m512 v = _mm512_set1_ps(val[P ? (int64_t)perm[p] : p]);
    const float* br = B + (int64_t)col[p] * N + j0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(br + 16 * r), acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(o + j0 + 16 * r, acc[r]);
}

template <typename I, bool P>
FS_AVX512 inline void spmm512_tail(const I* col, const float* val, const I* perm, int64_t p0, int64_t p1,
                                   const float* B, int64_t N, int64_t j0, float b, float* o) {
  const __mmask16 m = (__mmask16)((1u << (N - j0)) - 1u);
  __m512 acc = _mm512_set1_ps(b);
  for (int64_t p = p0; p < p1; ++p) {
    const __m512 v = _mm512_set1_ps(val[P ? (int64_t)perm[p] : p]);
    acc = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, B + (int64_t)col[p] * N + j0), acc);
  }
  _mm512_mask_storeu_ps(o + j0, m, acc);
}

// the rows r0..r1 for one chunk of columns: a chunk of B (K x 16R floats) stays in cache over the rows
template <typename I, bool P, int R>
FS_AVX512 void spmm512_rows(const I* crow, const I* col, const float* val, const I* perm, const float* B,
                            const float* bias, float* out, int64_t N, int64_t r0, int64_t r1, int64_t j) {
  for (int64_t i = r0; i < r1; ++i) {
    const float b = bias ? bias[i] : 0.f;
    if (R) spmm512_chunk<I, P, (R ? R : 1)>(col, val, perm, crow[i], crow[i + 1], B, N, j, b, out + i * N);
    else spmm512_tail<I, P>(col, val, perm, crow[i], crow[i + 1], B, N, j, b, out + i * N);
  }
}

template <typename I, bool P>
FS_AVX512 void spmm512(const I* crow, const I* col, const float* val, const I* perm, const float* B,
                       const float* bias, float* out, int64_t N, int64_t r0, int64_t r1) {
  int64_t j = 0;
  for (; j + 128 <= N; j += 128) spmm512_rows<I, P, 8>(crow, col, val, perm, B, bias, out, N, r0, r1, j);
  if (j + 64 <= N) { spmm512_rows<I, P, 4>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 64; }
  if (j + 32 <= N) { spmm512_rows<I, P, 2>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 32; }
  if (j + 16 <= N) { spmm512_rows<I, P, 1>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 16; }
  if (j < N) spmm512_rows<I, P, 0>(crow, col, val, perm, B, bias, out, N, r0, r1, j);
}

// one chunk of columns j0..j0+16R of every dot product of row i; `first` stores, else adds
template <typename I, int R>
FS_AVX512 inline void sddmm512_chunk(const I* col, int64_t p0, int64_t p1, const float* g, const float* X,
                                     int64_t N, int64_t j0, bool first, float* out) {
  __m512 gr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) gr[r] = _mm512_loadu_ps(g + j0 + 16 * r);
  for (int64_t p = p0; p < p1; ++p) {
    if (p + 4 < p1) {
      const float* nx = X + (int64_t)col[p + 4] * N + j0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(nx + 16 * r), _MM_HINT_T0);
    }
    const float* x = X + (int64_t)col[p] * N + j0;
    __m512 s0 = _mm512_mul_ps(gr[0], _mm512_loadu_ps(x));
    __m512 s1 = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 1; r < R; ++r) {
      if (r % 2) s1 = _mm512_fmadd_ps(gr[r], _mm512_loadu_ps(x + 16 * r), s1);
      else s0 = _mm512_fmadd_ps(gr[r], _mm512_loadu_ps(x + 16 * r), s0);
    }
    const float d = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    out[p] = first ? d : out[p] + d;
  }
}

template <typename I>
FS_AVX512 inline void sddmm512_tail(const I* col, int64_t p0, int64_t p1, const float* g, const float* X,
                                    int64_t N, int64_t j0, bool first, float* out) {
  const __mmask16 m = (__mmask16)((1u << (N - j0)) - 1u);
  const __m512 gr = _mm512_maskz_loadu_ps(m, g + j0);
  for (int64_t p = p0; p < p1; ++p) {
    const float d = _mm512_reduce_add_ps(_mm512_mul_ps(gr, _mm512_maskz_loadu_ps(m, X + (int64_t)col[p] * N + j0)));
    out[p] = first ? d : out[p] + d;
  }
}

template <typename I, int R>
FS_AVX512 void sddmm512_rows(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N,
                             int64_t r0, int64_t r1, int64_t j, bool acc) {
  for (int64_t i = r0; i < r1; ++i) {
    if (R) sddmm512_chunk<I, (R ? R : 1)>(col, crow[i], crow[i + 1], G + i * N, X, N, j, j == 0 && !acc, out);
    else sddmm512_tail<I>(col, crow[i], crow[i + 1], G + i * N, X, N, j, j == 0 && !acc, out);
  }
}

template <typename I>
FS_AVX512 void sddmm512(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N, bool acc,
                        int64_t r0, int64_t r1) {
  int64_t j = 0;
  for (; j + 128 <= N; j += 128) sddmm512_rows<I, 8>(crow, col, G, X, out, N, r0, r1, j, acc);
  if (j + 64 <= N) { sddmm512_rows<I, 4>(crow, col, G, X, out, N, r0, r1, j, acc); j += 64; }
  if (j + 32 <= N) { sddmm512_rows<I, 2>(crow, col, G, X, out, N, r0, r1, j, acc); j += 32; }
  if (j + 16 <= N) { sddmm512_rows<I, 1>(crow, col, G, X, out, N, r0, r1, j, acc); j += 16; }
  if (j < N) sddmm512_rows<I, 0>(crow, col, G, X, out, N, r0, r1, j, acc);
}

// ---------------------------------------------------------------- AVX2 + FMA (8 floats a vector)
FS_AVX2 inline __m256i tail_mask256(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

FS_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename I, bool P, int R>
FS_AVX2 inline void spmm256_chunk(const I* col, const float* val, const I* perm, int64_t p0, int64_t p1,
                                  const float* B, int64_t N, int64_t j0, float b, float* o) {
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_set1_ps(b);
  for (int64_t p = p0; p < p1; ++p) {
    const __m256 v = _mm256_set1_ps(val[P ? (int64_t)perm[p] : p]);
    const float* br = B + (int64_t)col[p] * N + j0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(br + 8 * r), acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(o + j0 + 8 * r, acc[r]);
}

template <typename I, bool P>
FS_AVX2 inline void spmm256_tail(const I* col, const float* val, const I* perm, int64_t p0, int64_t p1,
                                 const float* B, int64_t N, int64_t j0, float b, float* o) {
  const __m256i m = tail_mask256(N - j0);
  __m256 acc = _mm256_set1_ps(b);
  for (int64_t p = p0; p < p1; ++p) {
    const __m256 v = _mm256_set1_ps(val[P ? (int64_t)perm[p] : p]);
    acc = _mm256_fmadd_ps(v, _mm256_maskload_ps(B + (int64_t)col[p] * N + j0, m), acc);
  }
  _mm256_maskstore_ps(o + j0, m, acc);
}

template <typename I, bool P, int R>
FS_AVX2 void spmm256_rows(const I* crow, const I* col, const float* val, const I* perm, const float* B,
                          const float* bias, float* out, int64_t N, int64_t r0, int64_t r1, int64_t j) {
  for (int64_t i = r0; i < r1; ++i) {
    const float b = bias ? bias[i] : 0.f;
    if (R) spmm256_chunk<I, P, (R ? R : 1)>(col, val, perm, crow[i], crow[i + 1], B, N, j, b, out + i * N);
    else spmm256_tail<I, P>(col, val, perm, crow[i], crow[i + 1], B, N, j, b, out + i * N);
  }
}

template <typename I, bool P>
FS_AVX2 void spmm256(const I* crow, const I* col, const float* val, const I* perm, const float* B,
                     const float* bias, float* out, int64_t N, int64_t r0, int64_t r1) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) spmm256_rows<I, P, 8>(crow, col, val, perm, B, bias, out, N, r0, r1, j);
  if (j + 32 <= N) { spmm256_rows<I, P, 4>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 32; }
  if (j + 16 <= N) { spmm256_rows<I, P, 2>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 16; }
  if (j + 8 <= N) { spmm256_rows<I, P, 1>(crow, col, val, perm, B, bias, out, N, r0, r1, j); j += 8; }
  if (j < N) spmm256_rows<I, P, 0>(crow, col, val, perm, B, bias, out, N, r0, r1, j);
}

template <typename I, int R>
FS_AVX2 inline void sddmm256_chunk(const I* col, int64_t p0, int64_t p1, const float* g, const float* X,
                                   int64_t N, int64_t j0, bool first, float* out) {
  __m256 gr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) gr[r] = _mm256_loadu_ps(g + j0 + 8 * r);
  for (int64_t p = p0; p < p1; ++p) {
    const float* x = X + (int64_t)col[p] * N + j0;
    __m256 s0 = _mm256_mul_ps(gr[0], _mm256_loadu_ps(x));
    __m256 s1 = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 1; r < R; ++r) {
      if (r % 2) s1 = _mm256_fmadd_ps(gr[r], _mm256_loadu_ps(x + 8 * r), s1);
      else s0 = _mm256_fmadd_ps(gr[r], _mm256_loadu_ps(x + 8 * r), s0);
    }
    const float d = hsum256(_mm256_add_ps(s0, s1));
    out[p] = first ? d : out[p] + d;
  }
}

template <typename I>
FS_AVX2 inline void sddmm256_tail(const I* col, int64_t p0, int64_t p1, const float* g, const float* X,
                                  int64_t N, int64_t j0, bool first, float* out) {
  const __m256i m = tail_mask256(N - j0);
  const __m256 gr = _mm256_maskload_ps(g + j0, m);
  for (int64_t p = p0; p < p1; ++p) {
    const float d = hsum256(_mm256_mul_ps(gr, _mm256_maskload_ps(X + (int64_t)col[p] * N + j0, m)));
    out[p] = first ? d : out[p] + d;
  }
}

template <typename I, int R>
FS_AVX2 void sddmm256_rows(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N,
                           int64_t r0, int64_t r1, int64_t j, bool acc) {
  for (int64_t i = r0; i < r1; ++i) {
    if (R) sddmm256_chunk<I, (R ? R : 1)>(col, crow[i], crow[i + 1], G + i * N, X, N, j, j == 0 && !acc, out);
    else sddmm256_tail<I>(col, crow[i], crow[i + 1], G + i * N, X, N, j, j == 0 && !acc, out);
  }
}

template <typename I>
FS_AVX2 void sddmm256(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N, bool acc,
                      int64_t r0, int64_t r1) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) sddmm256_rows<I, 8>(crow, col, G, X, out, N, r0, r1, j, acc);
  if (j + 32 <= N) { sddmm256_rows<I, 4>(crow, col, G, X, out, N, r0, r1, j, acc); j += 32; }
  if (j + 16 <= N) { sddmm256_rows<I, 2>(crow, col, G, X, out, N, r0, r1, j, acc); j += 16; }
  if (j + 8 <= N) { sddmm256_rows<I, 1>(crow, col, G, X, out, N, r0, r1, j, acc); j += 8; }
  if (j < N) sddmm256_rows<I, 0>(crow, col, G, X, out, N, r0, r1, j, acc);
}
#endif  // FS_X86

// isa: 2 AVX-512F, 1 AVX2 + FMA, 0 portable
template <typename I>
void spmm(const I* crow, const I* col, const float* val, const I* perm, const float* B, const float* bias,
          float* out, int64_t N, int64_t r0, int64_t r1, int isa) {
#ifdef FS_X86
  if (isa == 2) return perm ? spmm512<I, true>(crow, col, val, perm, B, bias, out, N, r0, r1)
                            : spmm512<I, false>(crow, col, val, perm, B, bias, out, N, r0, r1);
  if (isa == 1) return perm ? spmm256<I, true>(crow, col, val, perm, B, bias, out, N, r0, r1)
                            : spmm256<I, false>(crow, col, val, perm, B, bias, out, N, r0, r1);
#endif
  return perm ? spmm_plain<I, true>(crow, col, val, perm, B, bias, out, N, r0, r1)
              : spmm_plain<I, false>(crow, col, val, perm, B, bias, out, N, r0, r1);
}

template <typename I>
void sddmm(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t N, int64_t r0,
           int64_t r1, int isa, bool acc) {
#ifdef FS_X86
  if (isa == 2) return sddmm512<I>(crow, col, G, X, out, N, acc, r0, r1);
  if (isa == 1) return sddmm256<I>(crow, col, G, X, out, N, acc, r0, r1);
#endif
  return sddmm_plain<I>(crow, col, G, X, out, N, r0, r1, acc);
}

// rows [r0, r1) of thread t of T: the first row whose nonzeros start at or after t/T of them
template <typename I>
void rows_of(const I* crow, int64_t rows, int t, int T, int64_t* r0, int64_t* r1) {
  const int64_t nnz = crow[rows];
  auto cut = [&](int k) -> int64_t {
    if (k == 0) return 0;
    if (k == T) return rows;
    const int64_t target = nnz * k / T;
    int64_t lo = 0, hi = rows;   // first row index i with crow[i] >= target
    while (lo < hi) { const int64_t mid = (lo + hi) / 2; if ((int64_t)crow[mid] < target) lo = mid + 1; else hi = mid; }
    return lo;
  };
  *r0 = cut(t);
  *r1 = cut(t + 1);
}

// A wide dense operand (N > PACK_ABOVE columns) whose rows are each read by many nonzeros (at
// least PACK_USES on average) is copied one chunk of PACK columns at a time into a contiguous
// (K, PACK) block shared by the threads: its rows, N floats apart in the original, would
// otherwise span a page each and the lookups of the pages cost more than the arithmetic
// (measured 1.45x faster for 4096 x 4096 at 90 % and N = 2048; with few uses per row the copy
// costs more than it saves: 4x slower for 128 x 1152 at 95 % and N = 32768). Each thread packs
// its own rows of the second operand (G) and unpacks its own rows of the output.
constexpr int64_t PACK = 128;
constexpr int64_t PACK_ABOVE = 256;
constexpr int64_t PACK_USES = 16;

template <typename I>
inline bool packs(const I* crow, int64_t rows, int64_t K, int64_t N) {
  return N > PACK_ABOVE && (int64_t)crow[rows] >= PACK_USES * K;
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// columns [j, j + w) of rows [r0, r1) of a row-major matrix with ld columns, to or from a block
inline void copy_block(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t r0, int64_t r1, int64_t w) {
  for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * ldd, src + r * lds, sizeof(float) * w);
}

template <typename I>
void spmm_all(const I* crow, const I* col, const float* val, const I* perm, const float* B, const float* bias,
              float* out, int64_t rows, int64_t K, int64_t N, int threads, int isa) {
  if (threads < 1 || rows < 2 * threads) threads = 1;
  float* bp = nullptr;
  float* op = nullptr;
  if (packs(crow, rows, K, N)) {
    bp = static_cast<float*>(std::malloc(sizeof(float) * K * PACK));
    op = static_cast<float*>(std::malloc(sizeof(float) * rows * PACK));
    if (!bp || !op) { std::free(bp); std::free(op); bp = op = nullptr; }   // unpacked: slower, still right
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    int64_t r0, r1;
    rows_of(crow, rows, thread_id(), thread_count(), &r0, &r1);
    if (!bp) {
      spmm<I>(crow, col, val, perm, B, bias, out, N, r0, r1, isa);
    } else {
      const int t = thread_id(), T = thread_count();
      for (int64_t j = 0; j < N; j += PACK) {
        const int64_t w = N - j < PACK ? N - j : PACK;
        copy_block(B + j, N, bp, w, K * t / T, K * (t + 1) / T, w);
        barrier();                                     // the whole block is packed
        spmm<I>(crow, col, val, perm, bp, bias, op, w, r0, r1, isa);
        copy_block(op, w, out + j, N, r0, r1, w);
        barrier();                                     // nobody reads the block any more
      }
    }
  }
  std::free(bp);
  std::free(op);
}

template <typename I>
void sddmm_all(const I* crow, const I* col, const float* G, const float* X, float* out, int64_t rows, int64_t K,
               int64_t N, int threads, int isa) {
  if (N == 0) {                                        // empty dot products
    if (rows > 0) std::memset(out, 0, sizeof(float) * (int64_t)crow[rows]);
    return;
  }
  if (threads < 1 || rows < 2 * threads) threads = 1;
  float* xp = nullptr;
  float* gp = nullptr;
  if (packs(crow, rows, K, N)) {
    xp = static_cast<float*>(std::malloc(sizeof(float) * K * PACK));
    gp = static_cast<float*>(std::malloc(sizeof(float) * rows * PACK));
    if (!xp || !gp) { std::free(xp); std::free(gp); xp = gp = nullptr; }
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    int64_t r0, r1;
    rows_of(crow, rows, thread_id(), thread_count(), &r0, &r1);
    if (!xp) {
      sddmm<I>(crow, col, G, X, out, N, r0, r1, isa, false);
    } else {
      const int t = thread_id(), T = thread_count();
      for (int64_t j = 0; j < N; j += PACK) {
        const int64_t w = N - j < PACK ? N - j : PACK;
        copy_block(X + j, N, xp, w, K * t / T, K * (t + 1) / T, w);
        copy_block(G + j, N, gp, w, r0, r1, w);
        barrier();
        sddmm<I>(crow, col, gp, xp, out, w, r0, r1, isa, j > 0);
        barrier();
      }
    }
  }
  std::free(xp);
  std::free(gp);
}

}  // namespace

extern "C" {

// the best instruction set this machine runs: 2 AVX-512F, 1 AVX2 + FMA, 0 portable C++
int fs_isa(void) {
#ifdef FS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int fs_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

void fs_spmm_i32(const int32_t* crow, const int32_t* col, const float* val, const int32_t* perm, const float* B,
                 const float* bias, float* out, int64_t rows, int64_t K, int64_t N, int threads, int isa) {
  spmm_all<int32_t>(crow, col, val, perm, B, bias, out, rows, K, N, threads, isa);
}

void fs_spmm_i64(const int64_t* crow, const int64_t* col, const float* val, const int64_t* perm, const float* B,
                 const float* bias, float* out, int64_t rows, int64_t K, int64_t N, int threads, int isa) {
  spmm_all<int64_t>(crow, col, val, perm, B, bias, out, rows, K, N, threads, isa);
}

void fs_sddmm_i32(const int32_t* crow, const int32_t* col, const float* G, const float* X, float* out, int64_t rows,
                  int64_t K, int64_t N, int threads, int isa) {
  sddmm_all<int32_t>(crow, col, G, X, out, rows, K, N, threads, isa);
}

void fs_sddmm_i64(const int64_t* crow, const int64_t* col, const float* G, const float* X, float* out, int64_t rows,
                  int64_t K, int64_t N, int threads, int isa) {
  sddmm_all<int64_t>(crow, col, G, X, out, rows, K, N, threads, isa);
}

}  // extern "C"
