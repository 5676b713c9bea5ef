// spectr's CPU kernels for decoding: a linear layer over weights kept in the file's own 32-blocks,
// and attention of a few new tokens over the KV cache.
//
// Both are row-invariant by construction: the output of a row (a token) is computed by the same
// instructions in the same order whatever the other rows are, how many there are, or which thread
// runs it. So a token's logits are the same bits alone or inside a verification tree, which is
// what makes greedy speculative decoding equal greedy decoding at the default precision.
//
// Linear: y[r, o] = sum over blocks b of (scale[o,b] * q_w[o,b,:] + offset[o,b]) . x[r,b,:].
// The activations are quantized per row and block, at the weight's activation_bits: int8 (q_x =
// round(x / s), s = max|x| / 127: the scheme llama.cpp computes these files with, its Q8 activations)
// or int16 (s = max|x| / 32512, a relative error of ~1e-5, far below bf16's 4e-3). Either way each
// block's dot with the weight codes is an exact integer sum; the offset term uses the block's exact
// float sum of x. The weight codes are read once per output row and shared by every row of
// activations (cheap trees).
//
// Where the CPU has AVX-512 VNNI the weights are repacked at load so that one VNNI instruction
// multiplies 4 inputs of 16 output rows at once. int8 codes go in as they are; int16 ones as two int8
// halves (q = 256 hi + lo, s = max|x| / 32512 so that hi stays within int8), so the block's integer dot
// is the same exact sum at twice the instructions. The codes of 16 outputs are decoded once per block
// and shared by every row; a block costs a row 8 (int8) or 16 (int16) integer dot instructions and ~7
// others for 16 outputs. With AVX2 only, the same layout in 8 lanes: vpmaddubsw then vpmaddwd make the
// exact dots of 8 outputs (~30 instructions a row and block for 4-bit codes, where one output at a time
// took ~9 for each output: measured, a 1536 x 576 Q4_1 layer 50 -> 22-31 us for one row, 271 -> 126-185
// for 16). Measured on the default target: int8
// moves the next-token law by a mean TV of 0.017 from float32 over the same weights (int16: 1e-4; bf16
// dense: 0.011) and halves what every row beyond the first costs. `spectr_kernel_path` names the path.
//
// Built on first use with the machine's compiler (-march=native) and cached; spectr falls back to
// torch's kernels where no compiler is found.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPECTR_SIMD 1
#else
#define SPECTR_SIMD 0
#endif
#if SPECTR_SIMD && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define SPECTR_VNNI 1
#else
#define SPECTR_VNNI 0
#endif
#if SPECTR_SIMD || defined(__F16C__)
#include <immintrin.h>
#endif

// The linear layers and norms of one Llama decoder layer, as the Python side describes them.
struct BlockWeight {
  const uint8_t* packed;  // spectr_pack's layout
  const float* bias;      // may be null
  int64_t bits, n, k;
  int64_t activation_bits;  // 16 or 8: how finely its input is quantized (see quantize_block)
};

struct DecoderLayer {
  const float* attention_norm;  // [D]
  const float* mlp_norm;        // [D]
  BlockWeight qkv, output, gate_up, down;
  int64_t hidden, heads, kv_heads, head_dim, ffn;
  float eps;
};

// One sequence's rows in a pass over the layers: its new tokens' queries (consecutive rows) attend to its
// own cache. A pass may hold several (the batch rows of one cache, or the requests a scheduler batches),
// each with its own cache, length and mask; every query's work is the same whichever others share the pass.
struct Segment {
  int64_t tokens;         // its rows
  float* keys;            // its cache at the pass's first layer: [G, capacity, E] (the next layer layer_stride on)
  float* keys_t;          // the keys transposed by tiles [G, tiled(capacity) / 16, E, 16] (layer_stride_t on), or null
  float* values;          // [G, capacity, E], as keys
  int64_t layer_stride, layer_stride_t, capacity;
  int64_t start;          // its new tokens' first slot; they attend slots 0..start + tokens - 1
  const uint8_t* mask;    // [tokens, start + tokens]
  int64_t dense_from;     // SparQ: slots before this are attended sparsely where the pass asks (0: dense)
  const float* value_means;  // SparQ: [G, E] a layer, mean_stride floats on (the values' mean before dense_from)
  int64_t mean_stride;
};

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t GROUP = 8;          // block scales and sums are padded to whole groups of 8 (one vector)
constexpr int64_t ROWS_PER_PASS = 8;  // most activation rows that share one decode of a weight block
constexpr int64_t MOST_HEAD_DIM = 512;  // of SparQ's queries (kernels.sparse_supported checks)
constexpr int64_t MOST_GROUP = 64;      // query heads a key/value head serves, for SparQ (likewise)

// IEEE half -> float (exact: every half is a float). F16C does it in one instruction where present.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while (!(mantissa & 0x400)) { mantissa <<= 1; ++shift; }
      bits = sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3ff) << 13);
    }
  } else {
    bits = sign | (exponent + 112) << 23 | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

inline int64_t padded_blocks(int64_t k) { return (k / BLOCK + GROUP - 1) / GROUP * GROUP; }

// A linear layer's input rows [rows, k], quantized per 32-block in the layout of this build's path: codes
// (SIMD: per row its high bytes [k] then its low bytes [k]; portable: int16 [P * 32] per row), then per
// row and block (P: the blocks, padded to whole groups on the portable path) the scale, the exact float
// sum of x, and (SIMD) the sum of the codes.
struct Activations {
  void* q;
  float* scales;
  float* sums;
  int32_t* sums_q;
  int64_t rows, k;
};

inline int64_t activation_blocks(int64_t k) { return SPECTR_SIMD ? k / BLOCK : padded_blocks(k); }

inline int64_t activation_bytes(int64_t rows, int64_t k) {  // two bytes a code, three words a block
  return rows * activation_blocks(k) * (2 * BLOCK + 3 * 4);
}

Activations activations_in(void* buffer, int64_t rows, int64_t k) {  // buffer: 64-byte aligned
  const int64_t p = activation_blocks(k);
  float* scales = reinterpret_cast<float*>(static_cast<char*>(buffer) + rows * p * 2 * BLOCK);
  return {buffer, scales, scales + rows * p, reinterpret_cast<int32_t*>(scales + 2 * rows * p), rows, k};
}

// A row's block of 32 inputs: q = round(x / s) (within int16), with s = max|x| / top: 127 for int8
// activations, 32512 (= 127 x 256, so that the VNNI path can split q into two int8 halves) for int16;
// every path quantizes the same way, so all agree up to
// the order of their float sums), and the float sum of x (in input order). Rows are padded with zero
// blocks up to a whole group (their scales are 0; see quantize_team).
constexpr float WIDE_TOP = 127.f * 256.f;
constexpr float NARROW_TOP = 127.f;  // int8 activations: q = round(x / s), s = max|x| / 127
inline float top_of(int64_t activation_bits) { return activation_bits == 8 ? NARROW_TOP : WIDE_TOP; }

#if !SPECTR_VNNI
// The scalar quantizer (the portable and AVX2 layouts store its codes each their way): q [32] as int32.
void quantize_block(const float* xb, float top, int32_t* q, float* scale_out, float* sum_out) {
  float amax = 0.f, sum = 0.f;
  for (int64_t i = 0; i < BLOCK; ++i) {
    amax = std::max(amax, std::fabs(xb[i]));
    sum += xb[i];
  }
  const float scale = amax / top;
  const float inverse = scale > 0.f ? 1.f / scale : 0.f;
  for (int64_t i = 0; i < BLOCK; ++i)
    q[i] = static_cast<int32_t>(std::nearbyint(std::min(top, std::max(-top, xb[i] * inverse))));
  // A non-finite input makes its outputs NaN (the scale carries it; the codes are then meaningless).
  *scale_out = std::isfinite(sum) ? scale : std::numeric_limits<float>::quiet_NaN();
  *sum_out = sum;
}
#endif

#if SPECTR_SIMD
inline float horizontal_sum(__m256 v) {  // a fixed order: (lanes 0-3 + 4-7), then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The vector exps' constants (exp16 and exp8): x is clamped to [−104, 89] (which changes no result: beyond,
// 0 and inf), n = round(x log2 e), r = x − n ln 2 with ln 2 in two parts (so r is exact enough), and e^r by
// its Taylor polynomial of degree 7, highest coefficient first (|r| <= ln 2 / 2: relative error below 1e-8).
constexpr float EXP_LOWEST = -104.f, EXP_HIGHEST = 89.f, LOG2_E = 1.44269504088896341f;
constexpr float LN2_HIGH = 0.693359375f, LN2_LOW = -2.12194440e-4f;
constexpr float EXP_TAYLOR[8] = {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};

// e^x in 8 lanes, lane by lane (a lane's result depends on its input alone), as exp16 computes it but for
// 2^n, two powers of two so that n from −150 to 128 needs no special case. NaN stays NaN.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(EXP_HIGHEST), _mm256_max_ps(_mm256_set1_ps(EXP_LOWEST), x));  // NaN: the 2nd
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x));
  __m256 p = _mm256_set1_ps(EXP_TAYLOR[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_TAYLOR[i]));
  const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
  auto power = [](__m256i e) {  // 2^e for e in [−75, 64]: a float's exponent field
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, power(half)), power(_mm256_sub_epi32(whole, half)));
}

// A query's n kept scores (in slot order, room for 8 more) replaced by exp(score − the largest), 8 at a
// time, each term summed in the lane of its place in the list, then a fixed tree: their sum. The same bits
// for the same scores, whichever slots were left out.
inline float exp_in_place8(float* scores, int64_t n) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  __m256 lanes = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, n - j))),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(scores + j, live), _mm256_set1_ps(top))),
                                   _mm256_castsi256_ps(live));
    _mm256_maskstore_ps(scores + j, live, p);
    lanes = _mm256_add_ps(lanes, p);
  }
  return horizontal_sum(lanes);
}
#endif

#if !SPECTR_SIMD
// One output row against NR rows of activations. The weight row: codes (BITS 4: 16 bytes a block,
// input j in the low nibble of byte j and input j + 16 in its high nibble, GGUF's Q4 layout; BITS 8:
// 32 int8), then its block scales and offsets (float16, zero past the last block). Each block's
// integer dot is exact; it is scaled into one float accumulator per row, in block order, and the
// offsets' dot with the block sums is added at the end: the same operations in the same order for
// every row, whatever NR is. (The portable path; every SIMD build reads the lanes layout below.)
template <int BITS, int NR>
inline void output_rows(const uint8_t* w, const uint16_t* w_scales, const uint16_t* w_offsets, int64_t blocks,
                        int64_t padded, const int16_t* q, const float* x_scales, const float* x_sums, float* out) {
  for (int r = 0; r < NR; ++r) {
    float acc = 0.f, offset_acc = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int16_t* qb = q + (r * padded + b) * BLOCK;
      int32_t dot = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        int32_t code;
        if (BITS == 4) {
          const uint8_t byte = w[b * 16 + (i % 16)];
          code = (i < 16 ? (byte & 15) : (byte >> 4)) - 8;  // centred, as the SIMD paths
        } else {
          code = static_cast<int8_t>(w[b * 32 + i]);
        }
        dot += code * qb[i];
      }
      acc = std::fma(static_cast<float>(dot), half_to_float(w_scales[b]) * x_scales[r * padded + b], acc);
      const float offset = BITS == 4 ? std::fma(half_to_float(w_scales[b]), 8.f, half_to_float(w_offsets[b]))
                                     : half_to_float(w_offsets[b]);
      offset_acc = std::fma(offset, x_sums[r * padded + b], offset_acc);
    }
    out[r] = acc + offset_acc;
  }
}

template <int BITS>
void output_row_chunk(int64_t nr, const uint8_t* w, const uint16_t* w_scales, const uint16_t* w_offsets, int64_t blocks,
                      int64_t padded, const int16_t* q, const float* x_scales, const float* x_sums, float* out) {
  switch (nr) {
    case 1: output_rows<BITS, 1>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 2: output_rows<BITS, 2>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 3: output_rows<BITS, 3>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 4: output_rows<BITS, 4>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 5: output_rows<BITS, 5>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 6: output_rows<BITS, 6>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    case 7: output_rows<BITS, 7>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
    default: output_rows<BITS, 8>(w, w_scales, w_offsets, blocks, padded, q, x_scales, x_sums, out); break;
  }
}
#endif

#if SPECTR_SIMD
// The lanes layout: output rows in groups of LANES, one output a 32-bit lane of a vector (16 with
// AVX-512, 8 with AVX2); per group and block of 32 inputs, the codes of the group's rows (4-bit: 4
// chunks of 4 x LANES bytes, chunk c holding in lane j (one int32 = 4 bytes) the codes of row j for
// inputs 4c..4c+3 in its low nibbles and 16+4c..16+4c+3 in its high ones; 8-bit: 8 vectors of 4 x LANES
// bytes, vector i holding inputs 4i..4i+3; with VNNI each code + 128 so it is unsigned), then the group's LANES
// block scales and LANES block offsets in float16. One group-block is contiguous: a group streams
// through memory in order. A row's block then costs a few integer instructions for all LANES outputs
// (the codes decoded once per block and shared by every row), where one output at a time would cost
// as many for each.
constexpr int64_t LANES = SPECTR_VNNI ? 16 : 8;
#if SPECTR_VNNI
using LaneVector = __m512;  // one output a lane
#else
using LaneVector = __m256;
#endif
// How far ahead a pass of several rows asks for its weight blocks (prefetching past the end of the weight
// is harmless: a prefetch never faults).
constexpr int64_t PREFETCH_BLOCKS = 8;

inline int64_t lanes_code_bytes(int bits) { return (bits == 4 ? 16 : 32) * LANES; }
inline int64_t lanes_block_bytes(int bits) { return lanes_code_bytes(bits) + 4 * LANES; }

// The lanes layout of a weight given in the row layout (see spectr_pack).
void lanes_pack(const uint8_t* codes, const uint16_t* params, int bits, int64_t n, int64_t k, uint8_t* out) {
  const int64_t blocks = k / BLOCK, padded = padded_blocks(k), row_bytes = bits == 4 ? k / 2 : k;
  const int64_t groups = (n + LANES - 1) / LANES, code_bytes = lanes_code_bytes(bits), vector = 4 * LANES;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* block = out + (g * blocks + b) * lanes_block_bytes(bits);
      uint16_t* half = reinterpret_cast<uint16_t*>(block + code_bytes);
      std::memset(block, 0, lanes_block_bytes(bits));
      for (int64_t j = 0; j < LANES; ++j) {
        const int64_t o = g * LANES + j;
        if (o >= n) continue;  // padding rows: zero codes, scales and offsets
        uint8_t c[BLOCK];
        const uint8_t* src = codes + o * row_bytes;
        for (int64_t i = 0; i < BLOCK; ++i)
          c[i] = bits == 4 ? (i < 16 ? src[b * 16 + i] & 15 : src[b * 16 + i - 16] >> 4)
                           : (SPECTR_VNNI ? src[b * 32 + i] ^ 0x80 : src[b * 32 + i]);
        for (int64_t i = 0; i < BLOCK; ++i) {
          const int64_t v = i / 4, byte = j * 4 + i % 4;
          if (bits == 4) {
            block[(v % 4) * vector + byte] |= static_cast<uint8_t>(v < 4 ? c[i] : c[i] << 4);
          } else {
            block[v * vector + byte] = c[i];
          }
        }
        half[j] = params[o * 2 * padded + b];
        half[LANES + j] = params[o * 2 * padded + padded + b];
      }
    }
}
#endif

#if SPECTR_VNNI

// One block of 32 inputs of a row: q = round(x / s) (the q of quantize_block); narrow (int8): q itself
// at high[0..31]; else as its high and low bytes (q = 256 hi + lo, both int8: hi at high[0..31], lo k
// bytes further, in the row's second half); the float sum of x (for the block's offset; in a fixed tree) and the sum of q
// (to centre the codes, below).

void quantize_block_wide(const float* xb, int64_t k, bool narrow, int8_t* high, float* scale_out, float* sum_out,
                         int32_t* sum_q_out) {
  const __m512i half = _mm512_set1_epi32(128);
  const float top_value = narrow ? NARROW_TOP : WIDE_TOP;
  const __m512 top = _mm512_set1_ps(top_value), bottom = _mm512_set1_ps(-top_value);
  const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));  // exact
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));  // a fixed tree
  const float scale = amax / top_value;
  const __m512 inverse = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  // Clamp, then round to nearest even (the default rounding mode): as quantize_block does.
  const __m512i v0 = _mm512_cvtps_epi32(_mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_mul_ps(x0, inverse))));
  const __m512i v1 = _mm512_cvtps_epi32(_mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_mul_ps(x1, inverse))));
  if (narrow) {  // the codes themselves, in the high bytes; the low ones are not read
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm512_cvtepi32_epi8(v0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + 16), _mm512_cvtepi32_epi8(v1));
  } else {
    const __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(v0, half), 8), h1 = _mm512_srai_epi32(_mm512_add_epi32(v1, half), 8);
    const __m512i l0 = _mm512_sub_epi32(v0, _mm512_slli_epi32(h0, 8)), l1 = _mm512_sub_epi32(v1, _mm512_slli_epi32(h1, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm512_cvtepi32_epi8(h0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + 16), _mm512_cvtepi32_epi8(h1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + k), _mm512_cvtepi32_epi8(l0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + k + 16), _mm512_cvtepi32_epi8(l1));
  }
  // A non-finite input makes its outputs NaN (the scale carries it; the codes are then meaningless).
  *scale_out = std::isfinite(sum) ? scale : std::numeric_limits<float>::quiet_NaN();
  *sum_out = sum;
  *sum_q_out = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));  // exact: integers
}

inline __m512i four_inputs(const int8_t* x) {
  int32_t word;
  std::memcpy(&word, x, sizeof(word));
  return _mm512_set1_epi32(word);
}

// One group of LANES outputs against NR rows: per block, each row's 16 integer dots are exact; the
// block's result is scaled (block scale x row scale) into the row's 16 float lanes (one lane per
// output), then the offset times the row's block sum. Every row runs this same sequence, whatever NR.
// The codes are centred before scaling (4-bit: q - 8, the offset becoming m + 8d; 8-bit: back from
// u = q + 128), in integers: the activations' rounding error then meets weights of the size of the
// weight itself, not of d.q (for Q4_1, whose q is 0..15 above an offset m, about half the error).
template <int BITS, int NR, bool NARROW>
inline void group_rows(const uint8_t* group, int64_t blocks, const int8_t* q, int64_t k, const float* x_scales,
                            const float* x_sums, const int32_t* x_sums_q, __m512* out) {
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low_nibbles = _mm512_set1_epi8(15);
  const int64_t stride = lanes_block_bytes(BITS), codes = lanes_code_bytes(BITS);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = group + b * stride;
    if (NR >= 2)  // measured: a third off a pass of 8 rows; no gain for one row (the hardware keeps up)
      for (int64_t line = 0; line < stride; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_BLOCKS * stride + line), _MM_HINT_T0);
    __m512i w[8];
    if (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i raw = _mm512_loadu_si512(block + 64 * c);
        w[c] = _mm512_and_si512(raw, low_nibbles);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_nibbles);
      }
    } else {
      for (int i = 0; i < 8; ++i) w[i] = _mm512_loadu_si512(block + 64 * i);
    }
    const __m512 w_scales = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + codes)));
    const __m512 w_offsets = _mm512_fmadd_ps(  // m + 8d (4-bit)
        w_scales, _mm512_set1_ps(8.f),
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + codes + 2 * LANES))));
    for (int r = 0; r < NR; ++r) {
      const int8_t* xq = q + 2 * r * k + b * BLOCK;  // inputs 4i..4i+3 broadcast to every lane, vector i
      __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], four_inputs(xq));
      __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], four_inputs(xq + 4));
      for (int i = 2; i < 8; i += 2) {
        even = _mm512_dpbusd_epi32(even, w[i], four_inputs(xq + 4 * i));
        odd = _mm512_dpbusd_epi32(odd, w[i + 1], four_inputs(xq + 4 * i + 4));
      }
      __m512i dot = _mm512_add_epi32(even, odd);  // exact: integers
      if (!NARROW) {  // the low bytes: dot = 256 dot(high) + dot(low)
        const int8_t* low = xq + k;
        even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], four_inputs(low));
        odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], four_inputs(low + 4));
        for (int i = 2; i < 8; i += 2) {
          even = _mm512_dpbusd_epi32(even, w[i], four_inputs(low + 4 * i));
          odd = _mm512_dpbusd_epi32(odd, w[i + 1], four_inputs(low + 4 * i + 4));
        }
        dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), _mm512_add_epi32(even, odd));
      }
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32((BITS == 8 ? 128 : 8) * x_sums_q[r * blocks + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w_scales, _mm512_set1_ps(x_scales[r * blocks + b])),
                               acc[r]);
      if (BITS == 4) acc[r] = _mm512_fmadd_ps(w_offsets, _mm512_set1_ps(x_sums[r * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
}

// A group's biases (zero past its width); a row's result plus them stored (or added) into y's row.
inline __m512 lanes_bias(const float* bias, int64_t width) {
  return bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << width) - 1), bias) : _mm512_setzero_ps();
}

inline void store_lanes(float* target, int64_t width, __m512 out, __m512 bias, bool accumulate) {
  const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
  const __m512 update = _mm512_add_ps(out, bias);
  _mm512_mask_storeu_ps(target, lanes, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, target), update) : update);
}
#endif

#if SPECTR_SIMD && !SPECTR_VNNI
// The AVX2 build's activations, in the VNNI build's layout: a row's block of 32 inputs as q = round(x / s)
// (quantize_block's q); narrow (int8): q itself at high[0..31]; else q = 256 hi + lo, hi at high[0..31]
// and lo (−128..127) k bytes further; the float sum of x (in input order) and the sum of q.
void quantize_block_bytes(const float* xb, int64_t k, bool narrow, int8_t* high, float* scale_out, float* sum_out,
                          int32_t* sum_q_out) {
  int32_t q[BLOCK];
  quantize_block(xb, narrow ? NARROW_TOP : WIDE_TOP, q, scale_out, sum_out);
  int32_t total = 0;
  for (int64_t i = 0; i < BLOCK; ++i) {
    const int32_t v = q[i];
    total += v;
    if (narrow) {
      high[i] = static_cast<int8_t>(v);
    } else {
      const int32_t hi = (v + 128) >> 8;  // arithmetic: −127..127, and lo = v − 256 hi in −128..127
      high[i] = static_cast<int8_t>(hi);
      high[k + i] = static_cast<int8_t>(v - 256 * hi);
    }
  }
  *sum_q_out = total;
}

// The exact integer dots of one block's codes (8 outputs, as 8 vectors of unsigned 4-bit values, vector i
// holding inputs 4i..4i+3 of each output) with one row's 32 int8 codes: vpmaddubsw multiplies unsigned by
// signed bytes and adds pairs into int16, which cannot overflow here (|pair| <= 2 x 15 x 128 = 3840, and
// 8 of them <= 30720), then one vpmaddwd adds the int16 pairs into each output's int32.
inline __m256i nibble_dots(const __m256i* w, const int8_t* x) {
  __m256i sums[4];
  for (int i = 0; i < 4; ++i) {
    int32_t a, b;
    std::memcpy(&a, x + 8 * i, sizeof(a));
    std::memcpy(&b, x + 8 * i + 4, sizeof(b));
    sums[i] = _mm256_add_epi16(_mm256_maddubs_epi16(w[2 * i], _mm256_set1_epi32(a)),
                               _mm256_maddubs_epi16(w[2 * i + 1], _mm256_set1_epi32(b)));
  }
  const __m256i total = _mm256_add_epi16(_mm256_add_epi16(sums[0], sums[1]), _mm256_add_epi16(sums[2], sums[3]));
  return _mm256_madd_epi16(total, _mm256_set1_epi16(1));
}

// The exact integer dots of one block of 8-bit codes q (8 outputs, vector i holding inputs 4i..4i+3 of
// each output) with one row's 32 int8 codes x: |q| times x with q's sign (vpsignb; |x| <= 127 for int8
// activations, so x·sign(q) fits), by pairs into int16 (|pair| <= 2 x 128 x 127: one vector at a time)
// and into int32. magnitudes: |q| per vector.
inline __m256i signed_dots(const uint8_t* codes, const __m256i* magnitudes, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 8; ++i) {
    int32_t a;
    std::memcpy(&a, x + 4 * i, sizeof(a));
    const __m256i signs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * i));
    const __m256i pairs = _mm256_maddubs_epi16(magnitudes[i], _mm256_sign_epi8(_mm256_set1_epi32(a), signs));
    total = _mm256_add_epi32(total, _mm256_madd_epi16(pairs, ones));
  }
  return total;
}

// The same dots for any int8 x (a low byte of int16 activations may be −128, which vpsignb cannot negate):
// u = q + 128 as two nibbles, u = 16 hi + lo, each a nibble_dots; dot(q, x) = dot(u, x) − 128 sum(x).
inline __m256i unsigned_dots(const uint8_t* codes, const int8_t* x) {
  const __m256i low_nibbles = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i low[8], high[8];
  for (int i = 0; i < 8; ++i) {
    const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * i)), flip);
    low[i] = _mm256_and_si256(u, low_nibbles);
    high[i] = _mm256_and_si256(_mm256_srli_epi16(u, 4), low_nibbles);
  }
  return _mm256_add_epi32(_mm256_slli_epi32(nibble_dots(high, x), 4), nibble_dots(low, x));
}

// One group of 8 outputs against NR rows, as the VNNI build's group_rows does it with AVX2's instructions: per block,
// each row's 8 integer dots are exact and centred in integers (4-bit: q − 8; 8-bit int16 activations:
// back from u = q + 128), scaled (block scale x row scale) into the row's 8 float lanes (one lane per
// output), then the offset times the row's block sum. Every row runs this same sequence, whatever NR.
template <int BITS, int NR, bool NARROW>
inline void group_rows(const uint8_t* group, int64_t blocks, const int8_t* q, int64_t k, const float* x_scales,
                            const float* x_sums, const int32_t* x_sums_q, __m256* out) {
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low_nibbles = _mm256_set1_epi8(15);
  const int64_t stride = lanes_block_bytes(BITS), codes = lanes_code_bytes(BITS);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = group + b * stride;
    if (NR >= 2)
      for (int64_t line = 0; line < stride; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_BLOCKS * stride + line), _MM_HINT_T0);
    __m256i w[8];  // 4-bit: the codes, vector i inputs 4i..4i+3; 8-bit int8 activations: |q|
    if (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
        w[c] = _mm256_and_si256(raw, low_nibbles);
        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_nibbles);
      }
    } else if (NARROW) {
      for (int i = 0; i < 8; ++i) w[i] = _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * i)));
    }
    const __m256 w_scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + codes)));
    const __m256 w_offsets = _mm256_fmadd_ps(  // m + 8d (4-bit)
        w_scales, _mm256_set1_ps(8.f), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + codes + 2 * LANES))));
    for (int r = 0; r < NR; ++r) {
      const int8_t* xq = q + 2 * r * k + b * BLOCK;
      __m256i dot;
      if (BITS == 4) {
        dot = nibble_dots(w, xq);
        if (!NARROW) dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 8), nibble_dots(w, xq + k));  // 256 high + low
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * x_sums_q[r * blocks + b]));
      } else if (NARROW) {
        dot = signed_dots(block, w, xq);
      } else {
        dot = _mm256_add_epi32(_mm256_slli_epi32(unsigned_dots(block, xq), 8), unsigned_dots(block, xq + k));
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(128 * x_sums_q[r * blocks + b]));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(w_scales, _mm256_set1_ps(x_scales[r * blocks + b])),
                               acc[r]);
      if (BITS == 4) acc[r] = _mm256_fmadd_ps(w_offsets, _mm256_set1_ps(x_sums[r * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
}

// A group's biases (zero past its width); a row's result plus them stored (or added) into y's row.
inline __m256 lanes_bias(const float* bias, int64_t width) {
  float lanes[LANES] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (bias) std::memcpy(lanes, bias, width * sizeof(float));
  return _mm256_loadu_ps(lanes);
}

inline void store_lanes(float* target, int64_t width, __m256 out, __m256 bias, bool accumulate) {
  float lanes[LANES];
  _mm256_storeu_ps(lanes, _mm256_add_ps(out, bias));
  for (int64_t j = 0; j < width; ++j) target[j] = accumulate ? target[j] + lanes[j] : lanes[j];
}
#endif

#if SPECTR_SIMD
// The lanes layout's linear layer, whichever instructions make a group's dots (group_rows, above).
template <int BITS, bool NARROW>
void group_chunk(int64_t nr, const uint8_t* group, int64_t blocks, const int8_t* q, int64_t k,
                 const float* x_scales, const float* x_sums, const int32_t* x_sums_q, LaneVector* out) {
  switch (nr) {
    case 1: group_rows<BITS, 1, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 2: group_rows<BITS, 2, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 3: group_rows<BITS, 3, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 4: group_rows<BITS, 4, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 5: group_rows<BITS, 5, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 6: group_rows<BITS, 6, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    case 7: group_rows<BITS, 7, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
    default: group_rows<BITS, 8, NARROW>(group, blocks, q, k, x_scales, x_sums, x_sums_q, out); break;
  }
}

// y = a @ W.T + bias (or y += that), work-shared over the groups of LANES outputs.
void lanes_linear_team(const BlockWeight& w, const Activations& a, float* y, bool accumulate) {
  const int64_t n = w.n, k = w.k, rows = a.rows, blocks = k / BLOCK, groups = (n + LANES - 1) / LANES;
  const int64_t group_bytes = blocks * lanes_block_bytes(static_cast<int>(w.bits));
  const int8_t* q = static_cast<const int8_t*>(a.q);
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = w.packed + g * group_bytes;
    const int64_t width = std::min(LANES, n - g * LANES);
    const LaneVector b = lanes_bias(w.bias ? w.bias + g * LANES : nullptr, width);
    LaneVector out[ROWS_PER_PASS];
    const int64_t passes = (rows + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
    for (int64_t pass = 0, r0 = 0; pass < passes; ++pass) {
      const int64_t nr = rows / passes + (pass < rows % passes ? 1 : 0);
      const int8_t* qr = q + 2 * r0 * k;
      const float *sr = a.scales + r0 * blocks, *ur = a.sums + r0 * blocks;
      const int32_t* tr = a.sums_q + r0 * blocks;
      const bool narrow = w.activation_bits == 8;
      if (w.bits == 4)
        narrow ? group_chunk<4, true>(nr, group, blocks, qr, k, sr, ur, tr, out)
               : group_chunk<4, false>(nr, group, blocks, qr, k, sr, ur, tr, out);
      else
        narrow ? group_chunk<8, true>(nr, group, blocks, qr, k, sr, ur, tr, out)
               : group_chunk<8, false>(nr, group, blocks, qr, k, sr, ur, tr, out);
      for (int64_t i = 0; i < nr; ++i)
        store_lanes(y + (r0 + i) * n + g * LANES, width, out[i], b, accumulate);
      r0 += nr;
    }
  }
}
#endif


#if !SPECTR_SIMD
// y = a @ W.T + bias (or y += that), one output row at a time, work-shared over the outputs.
void rows_linear_team(const BlockWeight& w, const Activations& a, float* y, bool accumulate) {
  const int64_t n = w.n, k = w.k, rows = a.rows, blocks = k / BLOCK, padded = padded_blocks(k);
  const int64_t row_bytes = w.bits == 4 ? k / 2 : k;
  const uint8_t* codes = w.packed;
  const uint16_t* params = reinterpret_cast<const uint16_t*>(w.packed + n * row_bytes);
  const int16_t* q = static_cast<const int16_t*>(a.q);
#pragma omp for schedule(static)
  for (int64_t o = 0; o < n; ++o) {
    const uint8_t* wo = codes + o * row_bytes;
    const uint16_t* w_scales = params + o * 2 * padded;
    const float b = w.bias ? w.bias[o] : 0.f;
    float out[ROWS_PER_PASS];
    // Rows in passes of near-equal size (9 rows: 5 + 4, not 8 + 1); a row's result does not depend on its pass.
    const int64_t passes = (rows + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
    for (int64_t pass = 0, r0 = 0; pass < passes; ++pass) {
      const int64_t nr = rows / passes + (pass < rows % passes ? 1 : 0);
      const int16_t* qr = q + r0 * padded * BLOCK;
      if (w.bits == 4)
        output_row_chunk<4>(nr, wo, w_scales, w_scales + padded, blocks, padded, qr, a.scales + r0 * padded,
                            a.sums + r0 * padded, out);
      else
        output_row_chunk<8>(nr, wo, w_scales, w_scales + padded, blocks, padded, qr, a.scales + r0 * padded,
                            a.sums + r0 * padded, out);
      for (int64_t i = 0; i < nr; ++i) {
        float& target = y[(r0 + i) * n + o];
        target = accumulate ? target + (out[i] + b) : out[i] + b;
      }
      r0 += nr;
    }
  }
}
#endif

// The team functions below share their loops among the threads of an OpenMP team: every thread of the
// team calls them (or one thread outside any parallel region). Each ends with the loop's barrier.

// Quantizes x [rows, k] into a for weight w (at its activation_bits), work-shared over its blocks (padding
// blocks: zero).
void quantize_team(const float* x, const Activations& a, const BlockWeight& w) {
  const int64_t k = a.k, p = activation_blocks(k);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < a.rows * p; ++i) {
    const int64_t r = i / p, b = i % p;
#if SPECTR_VNNI
    quantize_block_wide(x + r * k + b * BLOCK, k, w.activation_bits == 8, static_cast<int8_t*>(a.q) + 2 * r * k + b * BLOCK, a.scales + i,
                        a.sums + i, a.sums_q + i);
#elif SPECTR_SIMD
    quantize_block_bytes(x + r * k + b * BLOCK, k, w.activation_bits == 8, static_cast<int8_t*>(a.q) + 2 * r * k + b * BLOCK,
                         a.scales + i, a.sums + i, a.sums_q + i);
#else
    int16_t* qb = static_cast<int16_t*>(a.q) + i * BLOCK;
    if (b < k / BLOCK) {
      int32_t q[BLOCK];
      quantize_block(x + r * k + b * BLOCK, top_of(w.activation_bits), q, a.scales + i, a.sums + i);
      for (int64_t j = 0; j < BLOCK; ++j) qb[j] = static_cast<int16_t>(q[j]);
    } else {
      std::memset(qb, 0, sizeof(int16_t) * BLOCK);
      a.scales[i] = a.sums[i] = 0.f;
    }
#endif
  }
}

// y [rows, n] = a @ W.T + bias; with accumulate, y += that (y + (a @ W.T + bias): a residual update).
void linear_team(const BlockWeight& w, const Activations& a, float* y, bool accumulate) {
#if SPECTR_SIMD
  lanes_linear_team(w, a, y, accumulate);
#else
  rows_linear_team(w, a, y, accumulate);
#endif
}

// The dot of two float vectors of length e (a multiple of 8), in 8 fixed lanes then a fixed tree.
inline float dot8(const float* a, const float* b, int64_t e) {
  float lane[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < e; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] = std::fma(a[i + l], b[i + l], lane[l]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

#if SPECTR_VNNI
// e^x in 16 lanes, each lane from its own input alone: 2^n e^r (EXP_TAYLOR's constants), scaled by 2^n
// (scalef: 0 below the float range, inf above). NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(EXP_HIGHEST), _mm512_max_ps(_mm512_set1_ps(EXP_LOWEST), x));  // NaN: the 2nd
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x));
  __m512 p = _mm512_set1_ps(EXP_TAYLOR[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_TAYLOR[i]));
  return _mm512_scalef_ps(p, n);
}

// The attention of up to 6 queries of one key/value head at once (the heads of a group, for one or a few
// tokens), e a multiple of 16, over keys stored transposed in tiles of 16 slots (kt [capacity / 16, E, 16]:
// per tile, a row of 16 slots per component, so a tile is 4 KB read in order for a head of 64; SparQ keeps
// its keys by component too). The scores of 16 slots are e multiply-adds into 16 lanes, each slot's score an fma
// chain over the components in order (q0 k0, + q1 k1, ...) whatever its lane, so 4 instructions a score
// for a head of 64 and no horizontal sums; each key and value row is read once for all the queries (at
// long contexts reading the cache is the cost). The softmax and the weighted sum of values then run over
// the slots a query sees, in slot order, a term's lane fixed by its place in that list: a query's result
// depends only on the keys and values it sees, not on which other slots exist or which queries share
// the pass. scores: NQ x (slots + 16) floats of scratch.
template <int NQ>
void attend_queries_t(const float* const* queries, const uint8_t* const* masks, const float* kt, const float* vb,
                      int64_t slots, int64_t e, float scale, float* scores, float* const* outs) {
  const int64_t stride = slots + 16;
  int64_t n[NQ];
  for (int i = 0; i < NQ; ++i) n[i] = 0;
  for (int64_t j = 0; j < slots; j += 16) {
    const int64_t width = std::min<int64_t>(16, slots - j);
    const __mmask16 live = width == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << width) - 1);
    __m512 acc[NQ];
    for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < e; ++l) {
      const __m512 k = _mm512_maskz_loadu_ps(live, kt + (j * e + l * 16));  // tile j / 16, row l
      for (int i = 0; i < NQ; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(queries[i][l]), k, acc[i]);
    }
    for (int i = 0; i < NQ; ++i) {  // keep the scores of the slots this query sees, in slot order
      const __mmask16 seen = _mm_mask_cmpneq_epi8_mask(live, _mm_maskz_loadu_epi8(live, masks[i] + j), _mm_setzero_si128());
      // Compressed in a register and stored whole (a row has 16 spare lanes; the next store overwrites the
      // rest): a compressing store to memory is microcoded on Zen 4, and this one made a 4-token pass over a
      // 4k cache 1.14x slower (18.1 against 15.9 ms, measured side by side).
      _mm512_storeu_ps(scores + i * stride + n[i], _mm512_maskz_compress_ps(seen, _mm512_mul_ps(acc[i], _mm512_set1_ps(scale))));
      n[i] += __builtin_popcount(seen);
    }
  }
  __m512 totals[NQ];
  for (int i = 0; i < NQ; ++i) {
    float* own = scores + i * stride;
    float top = -INFINITY;
    for (int64_t j = 0; j < n[i]; ++j) top = std::max(top, own[j]);
    __m512 lanes = _mm512_setzero_ps();
    for (int64_t j = 0; j < n[i]; j += 16) {
      const __mmask16 live = n[i] - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n[i] - j)) - 1);
      const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, own + j),
                                                                     _mm512_set1_ps(top))));
      _mm512_mask_storeu_ps(own + j, live, p);
      lanes = _mm512_add_ps(lanes, p);
    }
    totals[i] = _mm512_set1_ps(_mm512_reduce_add_ps(lanes));
  }
  if (e % 64 == 0) {
    for (int64_t c = 0; c < e; c += 64) {  // 64 lanes of the values at a time, 4 registers a query
      __m512 acc[NQ][4];
      int64_t at[NQ];
      for (int i = 0; i < NQ; ++i) {
        at[i] = 0;
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
      }
      for (int64_t j = 0; j < slots; ++j) {
        const float* v = vb + j * e + c;
        for (int i = 0; i < NQ; ++i) {
          if (!masks[i][j]) continue;
          const __m512 p = _mm512_set1_ps(scores[i * stride + at[i]++]);
          acc[i][0] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v), acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16), acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 32), acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 48), acc[i][3]);
        }
      }
      for (int i = 0; i < NQ; ++i)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(outs[i] + c + 16 * u, _mm512_div_ps(acc[i][u], totals[i]));
    }
    return;
  }
  for (int64_t c = 0; c < e; c += 16) {  // one 16-lane column of the values at a time: the same sums
    __m512 acc[NQ];
    int64_t at[NQ];
    for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps(), at[i] = 0;
    for (int64_t j = 0; j < slots; ++j) {
      const __m512 v = _mm512_loadu_ps(vb + j * e + c);
      for (int i = 0; i < NQ; ++i)
        if (masks[i][j]) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(scores[i * stride + at[i]++]), v, acc[i]);
    }
    for (int i = 0; i < NQ; ++i) _mm512_storeu_ps(outs[i] + c, _mm512_div_ps(acc[i], totals[i]));
  }
}

void attend_queries_t(int nq, const float* const* queries, const uint8_t* const* masks, const float* kt,
                      const float* vb, int64_t slots, int64_t e, float scale, float* scores, float* const* outs) {
  switch (nq) {
    case 1: attend_queries_t<1>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    case 2: attend_queries_t<2>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    case 3: attend_queries_t<3>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    case 4: attend_queries_t<4>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    case 5: attend_queries_t<5>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    default: attend_queries_t<6>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
  }
}
#endif

#if SPECTR_SIMD && !SPECTR_VNNI
// For each 8-bit mask, the lanes it sets in order (then zeros): the indices that move a vector's kept lanes
// to its front (AVX2 has no compressing instruction).
struct LeftPack {
  int32_t lanes[256][8];
  constexpr LeftPack() : lanes{} {
    for (int mask = 0; mask < 256; ++mask) {
      int kept = 0;
      for (int i = 0; i < 8; ++i)
        if (mask >> i & 1) lanes[mask][kept++] = i;
    }
  }
};
constexpr LeftPack LEFT_PACK{};

// The seen bits of 8 mask bytes (the first `width` of them).
inline int seen_bits(const uint8_t* mask, int64_t width) {
  if (width == 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask));
    return ~_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128())) & 0xff;
  }
  int bits = 0;
  for (int64_t i = 0; i < width; ++i) bits |= (mask[i] != 0) << i;
  return bits;
}

// attend_queries_t with AVX2 (see there): up to 3 queries of one key/value head (a group's heads at one
// token) over keys transposed by tiles of 16 slots, a tile as two vectors of 8. Each slot's score is an fma
// chain over the components in order; the scores of the slots a query sees are packed to the front of
// its list in slot order (LEFT_PACK), the softmax's terms summed in the lane of their place in that list,
// and the values summed in slot order: a query's result depends only on the keys and values it sees.
// Measured against one query a task over row-major keys, side by side (1 / 4 / 16 tokens): over 3000
// cached tokens 1.06x / 1.26x / 1.38x faster, over 1000 1.03x / 1.15x / 1.13x, over 200 about even.
template <int NQ>
void attend_queries_t8(const float* const* queries, const uint8_t* const* masks, const float* kt, const float* vb,
                       int64_t slots, int64_t e, float scale, float* scores, float* const* outs) {
  const int64_t stride = slots + 16;
  int64_t n[NQ];
  for (int i = 0; i < NQ; ++i) n[i] = 0;
  for (int64_t j = 0; j < slots; j += 16) {
    __m256 acc[NQ][2];
    for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t l = 0; l < e; ++l) {  // tile j / 16, row l: whole tiles exist (the cache's capacity is tiled)
      const __m256 k0 = _mm256_loadu_ps(kt + (j * e + l * 16)), k1 = _mm256_loadu_ps(kt + (j * e + l * 16 + 8));
      for (int i = 0; i < NQ; ++i) {
        const __m256 qv = _mm256_set1_ps(queries[i][l]);
        acc[i][0] = _mm256_fmadd_ps(qv, k0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(qv, k1, acc[i][1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t first = j + 8 * h, width = std::min<int64_t>(8, slots - first);
      if (width <= 0) break;
      for (int i = 0; i < NQ; ++i) {  // keep the scores of the slots this query sees, in slot order
        const int bits = seen_bits(masks[i] + first, width);
        const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK.lanes[bits]));
        _mm256_storeu_ps(scores + i * stride + n[i],
                         _mm256_permutevar8x32_ps(_mm256_mul_ps(acc[i][h], _mm256_set1_ps(scale)), order));
        n[i] += __builtin_popcount(bits);
      }
    }
  }
  __m256 totals[NQ];
  for (int i = 0; i < NQ; ++i) totals[i] = _mm256_set1_ps(exp_in_place8(scores + i * stride, n[i]));
  for (int64_t c = 0; c < e; c += 16) {  // 16 components of the values at a time, 2 registers a query
    __m256 sum[NQ][2];
    int64_t at[NQ];
    for (int i = 0; i < NQ; ++i) at[i] = 0, sum[i][0] = sum[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < slots; ++j) {
      const float* v = vb + j * e + c;
      for (int i = 0; i < NQ; ++i) {
        if (!masks[i][j]) continue;
        const __m256 p = _mm256_set1_ps(scores[i * stride + at[i]++]);
        sum[i][0] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), sum[i][0]);
        sum[i][1] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), sum[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm256_storeu_ps(outs[i] + c, _mm256_div_ps(sum[i][0], totals[i]));
      _mm256_storeu_ps(outs[i] + c + 8, _mm256_div_ps(sum[i][1], totals[i]));
    }
  }
}

void attend_queries_t(int nq, const float* const* queries, const uint8_t* const* masks, const float* kt,
                      const float* vb, int64_t slots, int64_t e, float scale, float* scores, float* const* outs) {
  switch (nq) {
    case 1: attend_queries_t8<1>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    case 2: attend_queries_t8<2>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
    default: attend_queries_t8<3>(queries, masks, kt, vb, slots, e, scale, scores, outs); break;
  }
}
#endif

// One query over the slots it may see (`seen`, n slot indices in slot order) of one key/value head:
// scores, softmax, then the weighted sum of values into out [e]. A slot's score is one chain of fused
// multiply-adds in 8 lanes and a fixed horizontal sum, and values are summed in the order of `seen`,
// so the result depends only on the keys and values seen, not on which other slots exist.
void attend_query(const float* qv, const float* kb, const float* vb, const int32_t* seen, int64_t n, int64_t e,
                  float scale, float* scores, float* out) {
#if SPECTR_SIMD
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four independent chains at a time
    const float *k0 = kb + seen[j] * e, *k1 = kb + seen[j + 1] * e, *k2 = kb + seen[j + 2] * e,
                *k3 = kb + seen[j + 3] * e;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < e; i += 8) {
      const __m256 query = _mm256_loadu_ps(qv + i);
      a0 = _mm256_fmadd_ps(query, _mm256_loadu_ps(k0 + i), a0);
      a1 = _mm256_fmadd_ps(query, _mm256_loadu_ps(k1 + i), a1);
      a2 = _mm256_fmadd_ps(query, _mm256_loadu_ps(k2 + i), a2);
      a3 = _mm256_fmadd_ps(query, _mm256_loadu_ps(k3 + i), a3);
    }
    scores[j] = horizontal_sum(a0) * scale;
    scores[j + 1] = horizontal_sum(a1) * scale;
    scores[j + 2] = horizontal_sum(a2) * scale;
    scores[j + 3] = horizontal_sum(a3) * scale;
  }
  for (; j < n; ++j) {
    const float* k0 = kb + seen[j] * e;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < e; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_loadu_ps(k0 + i), a0);
    scores[j] = horizontal_sum(a0) * scale;
  }
  // The softmax's exps 8 at a time, each term in the lane of its place in `seen`. Measured against a scalar
  // exp a slot, side by side: steps of 1 / 16 tokens over 1000 cached ones 1.07x / 1.14x faster.
  const __m256 total_lanes = _mm256_set1_ps(exp_in_place8(scores, n));
  for (int64_t i0 = 0; i0 < e; i0 += 32) {  // 32 output lanes at a time, kept in registers
    if (i0 + 32 <= e) {
      __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
      for (j = 0; j < n; ++j) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const float* v = vb + seen[j] * e + i0;
        c0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), c0);
        c1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), c1);
        c2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), c2);
        c3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), c3);
      }
      _mm256_storeu_ps(out + i0, _mm256_div_ps(c0, total_lanes));
      _mm256_storeu_ps(out + i0 + 8, _mm256_div_ps(c1, total_lanes));
      _mm256_storeu_ps(out + i0 + 16, _mm256_div_ps(c2, total_lanes));
      _mm256_storeu_ps(out + i0 + 24, _mm256_div_ps(c3, total_lanes));
    } else {
      for (int64_t i = i0; i < e; i += 8) {
        __m256 c = _mm256_setzero_ps();
        for (j = 0; j < n; ++j) c = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), _mm256_loadu_ps(vb + seen[j] * e + i), c);
        _mm256_storeu_ps(out + i, _mm256_div_ps(c, total_lanes));
      }
    }
  }
#else
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot8(qv, kb + seen[j] * e, e) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.f;
  for (int64_t i = 0; i < e; ++i) out[i] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = std::exp(scores[j] - top);
    total += p;
    const float* vj = vb + seen[j] * e;
    for (int64_t i = 0; i < e; ++i) out[i] = std::fma(p, vj[i], out[i]);
  }
  for (int64_t i = 0; i < e; ++i) out[i] /= total;
#endif
}

void rms_norm_row(const float* x, int64_t d, const float* weight, float eps, float* out) {
  const float inverse = 1.f / std::sqrt(dot8(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = weight[i] * (x[i] * inverse);
}

// out [n] = silu(gate) * up, element by element.
void silu_times(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
#if SPECTR_VNNI
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(gate + i);
    const __m512 sigmoid_inverse = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(x, sigmoid_inverse), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// Slots rounded up to whole tiles of 16, for the transposed keys.
inline int64_t tiled(int64_t capacity) { return (capacity + 15) / 16 * 16; }

// SparQ attention (attention.py's SparQ; Ribar et al., 2023) for the heads of one key/value group at one
// token, a draft's approximation: the group's `rank` largest query components (by the sum of the heads'
// magnitudes) score every slot from those components of the keys alone (with the keys transposed by tiles
// they are rank rows of 16 slots a tile, a quarter of the cache for 16 of 64); of the slots before
// dense_from the `keep` the heads' approximate softmaxes weigh most together, and every slot from
// dense_from on, are attended exactly; the approximate weight of the older slots left out goes to their
// mean value (`mean` [E]). Slots the mask hides are never read. Where `keep` covers every older slot a
// query sees, this is plain attention. scratch: sparq_scratch(heads of the group, slots, e) floats.
struct Sparse {
  int64_t rank, keep, dense_from;
};


inline int64_t sparq_scratch(int64_t heads, int64_t slots, int64_t e) { return (2 * heads + 2) * (slots + 16) + heads * e; }

void sparq_group(const float* const* queries, int64_t heads, const uint8_t* seen, const float* kt, const float* kb,
                 const float* vb, int64_t slots, int64_t e, const Sparse& sparse, const float* mean, float* scratch,
                 float* const* outs) {
  const int64_t stride = slots + 16;
  float* weights = scratch;                                          // heads x stride: approximate softmax
  float* older = weights + heads * stride;                           // stride: the heads' weights summed
  float* exact = older + stride;                                     // heads x stride: exact scores
  int32_t* chosen = reinterpret_cast<int32_t*>(exact + heads * stride);  // stride: slots attended exactly
  float* part = reinterpret_cast<float*>(chosen + stride);           // heads x rank: scaled query components
  int32_t order[MOST_HEAD_DIM];
  float magnitude[MOST_HEAD_DIM];
  for (int64_t c = 0; c < e; ++c) {
    float m = 0.f;
    for (int64_t h = 0; h < heads; ++h) m += std::fabs(queries[h][c]);
    magnitude[c] = m;
    order[c] = static_cast<int32_t>(c);
  }
  const int64_t rank = std::min(sparse.rank, e);
  std::partial_sort(order, order + rank, order + e, [&](int32_t a, int32_t b) {
    return magnitude[a] > magnitude[b] || (magnitude[a] == magnitude[b] && a < b);
  });
  std::sort(order, order + rank);  // read the key rows in memory order
  const float tiny = std::numeric_limits<float>::min();
  for (int64_t h = 0; h < heads; ++h) {
    float all = 0.f, kept = 0.f;
    for (int64_t c = 0; c < e; ++c) all += std::fabs(queries[h][c]);
    for (int64_t i = 0; i < rank; ++i) kept += std::fabs(queries[h][order[i]]);
    // The paper's temperature: the components kept carry this share of the query's L1 norm.
    const float scale = 1.f / std::sqrt(static_cast<float>(e) * std::max(kept / std::max(all, tiny), tiny));
    for (int64_t i = 0; i < rank; ++i) part[h * rank + i] = queries[h][order[i]] * scale;
  }
  // Approximate scores of every slot seen (-inf where hidden), then each head's softmax over them, and
  // the older slots' weights summed over the heads (-1 where hidden: never kept).
  const int64_t dense_from = std::min(sparse.dense_from, slots);
  int64_t seen_older = 0;
#if SPECTR_VNNI
  if (kt != nullptr && e % 16 == 0 && heads <= 8) {
    const __m512 hidden = _mm512_set1_ps(-INFINITY);
    __m512 top[8];
    for (int64_t h = 0; h < heads; ++h) top[h] = hidden;
    for (int64_t j = 0; j < slots; j += 16) {
      const int64_t width = std::min<int64_t>(16, slots - j);
      const __mmask16 live = width == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << width) - 1);
      const __mmask16 look = _mm_mask_cmpneq_epi8_mask(live, _mm_maskz_loadu_epi8(live, seen + j), _mm_setzero_si128());
      __m512 acc[8];
      for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_setzero_ps();
      // A tile's rows are 64 bytes apart from the next tile's by 4 KB, which the hardware does not fetch
      // ahead: ask for the rows AHEAD tiles on (at long contexts the cache comes from memory, and fetched
      // one line at a time this pass waited on memory more than the whole cache read in order).
      constexpr int64_t AHEAD = 8;
      if (j + AHEAD * 16 < slots)
        for (int64_t i = 0; i < rank; ++i)
          __builtin_prefetch(kt + ((j + AHEAD * 16) * e + order[i] * 16));
      if (look)
        for (int64_t i = 0; i < rank; ++i) {
          const __m512 k = _mm512_loadu_ps(kt + (j * e + order[i] * 16));  // tile j / 16, row order[i]
          for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(part[h * rank + i]), k, acc[h]);
        }
      for (int64_t h = 0; h < heads; ++h) {
        const __m512 score = _mm512_mask_blend_ps(look, hidden, acc[h]);
        _mm512_storeu_ps(weights + h * stride + j, score);
        top[h] = _mm512_max_ps(top[h], score);
      }
    }
    float inverse[8];
    for (int64_t h = 0; h < heads; ++h) {
      float* w = weights + h * stride;
      const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top[h]));
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < slots; j += 16) {  // the scratch has room for a whole last vector
        const __m512 score = _mm512_loadu_ps(w + j);
        const __mmask16 live = _mm512_cmp_ps_mask(score, hidden, _CMP_NEQ_OQ) &
            (slots - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (slots - j)) - 1));
        const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(score, most)));
        _mm512_storeu_ps(w + j, p);
        total = _mm512_add_ps(total, p);
      }
      inverse[h] = 1.f / _mm512_reduce_add_ps(total);
    }
    for (int64_t j = 0; j < dense_from; j += 16) {
      const int64_t width = std::min<int64_t>(16, dense_from - j);
      const __mmask16 live = width == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << width) - 1);
      const __mmask16 look = _mm_mask_cmpneq_epi8_mask(live, _mm_maskz_loadu_epi8(live, seen + j), _mm_setzero_si128());
      __m512 sum = _mm512_setzero_ps();
      for (int64_t h = 0; h < heads; ++h) {
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(weights + h * stride + j), _mm512_set1_ps(inverse[h]));
        _mm512_storeu_ps(weights + h * stride + j, p);
        sum = _mm512_add_ps(sum, p);
      }
      _mm512_storeu_ps(older + j, _mm512_mask_blend_ps(look, _mm512_set1_ps(-1.f), sum));
      seen_older += __builtin_popcount(look);
    }
    for (int64_t h = 0; h < heads; ++h)  // the dense slots' weights too (kept sums them)
      for (int64_t j = dense_from / 16 * 16 + (dense_from % 16 ? 16 : 0); j < slots; ++j) weights[h * stride + j] *= inverse[h];
  } else
#endif
  {
    for (int64_t j = 0; j < slots; ++j) {
      const float* key = kb + j * e;
      for (int64_t h = 0; h < heads; ++h) {
        float s = -INFINITY;
        if (seen[j]) {
          s = 0.f;
          for (int64_t i = 0; i < rank; ++i) s = std::fma(part[h * rank + i], key[order[i]], s);
        }
        weights[h * stride + j] = s;
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* w = weights + h * stride;
      float top = -INFINITY, total = 0.f;
      for (int64_t j = 0; j < slots; ++j) top = std::max(top, w[j]);
      for (int64_t j = 0; j < slots; ++j) {
        w[j] = seen[j] ? std::exp(w[j] - top) : 0.f;
        total += w[j];
      }
      const float inverse = 1.f / total;
      for (int64_t j = 0; j < slots; ++j) w[j] *= inverse;
    }
    for (int64_t j = 0; j < dense_from; ++j) {
      float sum = 0.f;
      for (int64_t h = 0; h < heads; ++h) sum += weights[h * stride + j];
      older[j] = seen[j] ? sum : -1.f;
      seen_older += seen[j] != 0;
    }
  }
  // The older slots kept: those whose summed weight is at or above a threshold found by bisection on the
  // weights' bits (non-negative floats order as their bits).
  int64_t n = 0;
  const bool whole = seen_older <= sparse.keep;
  if (whole) {
    for (int64_t j = 0; j < dense_from; ++j)
      if (seen[j]) chosen[n++] = static_cast<int32_t>(j);
  } else {
    const int32_t* bits = reinterpret_cast<const int32_t*>(older);
    auto at_least = [&](int32_t threshold) {
      int64_t count = 0, j = 0;
#if SPECTR_VNNI
      const __m512i t = _mm512_set1_epi32(threshold);
      for (; j + 16 <= dense_from; j += 16)
        count += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(bits + j), t));
#endif
      for (; j < dense_from; ++j) count += bits[j] >= threshold;
      return count;
    };
    int32_t low = 0, high = 0;  // at_least(low) > keep >= at_least(high)
    for (int64_t j = 0; j < dense_from; ++j) high = std::max(high, bits[j]);
    high += 1;
    while (high - low > 1) {
      const int32_t middle = low + (high - low) / 2;
      (at_least(middle) > sparse.keep ? low : high) = middle;
    }
    for (int64_t j = 0; j < dense_from; ++j)
      if (bits[j] >= high) chosen[n++] = static_cast<int32_t>(j);
  }
  for (int64_t j = dense_from; j < slots; ++j)
    if (seen[j]) chosen[n++] = static_cast<int32_t>(j);
  // Exact attention over the slots chosen, then the mean-value correction. Their rows are scattered
  // over the cache: ask for all of them first, so that memory serves them together.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < e; c += 16) {
      __builtin_prefetch(kb + chosen[i] * e + c);
      __builtin_prefetch(vb + chosen[i] * e + c);
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(e));
  float total[MOST_GROUP], kept[MOST_GROUP];
  for (int64_t h = 0; h < heads; ++h) {
    float* s = exact + h * stride;
    float top = -INFINITY;
    kept[h] = total[h] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
#if SPECTR_VNNI
      if (e % 16 == 0) {
        const float* key = kb + chosen[i] * e;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < e; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(queries[h] + c), _mm512_loadu_ps(key + c), acc);
        s[i] = _mm512_reduce_add_ps(acc) * scale;
      } else
#endif
        s[i] = dot8(queries[h], kb + chosen[i] * e, e) * scale;
      top = std::max(top, s[i]);
      kept[h] += weights[h * stride + chosen[i]];
    }
    int64_t i = 0;
#if SPECTR_VNNI
    __m512 lanes = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(top)));
      _mm512_storeu_ps(s + i, p);
      lanes = _mm512_add_ps(lanes, p);
    }
    total[h] = _mm512_reduce_add_ps(lanes);
#endif
    for (; i < n; ++i) {
      s[i] = std::exp(s[i] - top);
      total[h] += s[i];
    }
    if (whole) kept[h] = 1.f;
  }
#if SPECTR_VNNI
  if (e % 16 == 0 && heads <= 8) {
    for (int64_t c = 0; c < e; c += 16) {  // 16 lanes of every head's output at a time
      __m512 acc[8];
      for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 v = _mm512_loadu_ps(vb + chosen[i] * e + c);
        for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(exact[h * stride + i]), v, acc[h]);
      }
      for (int64_t h = 0; h < heads; ++h)
        _mm512_storeu_ps(outs[h] + c, _mm512_fmadd_ps(acc[h], _mm512_set1_ps(kept[h] / total[h]),
                                                      _mm512_mul_ps(_mm512_set1_ps(1.f - kept[h]), _mm512_loadu_ps(mean + c))));
    }
    return;
  }
#endif
  for (int64_t h = 0; h < heads; ++h) {
    const float* s = exact + h * stride;
    float* out = outs[h];
    for (int64_t c = 0; c < e; ++c) out[c] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float* v = vb + chosen[i] * e;
      for (int64_t c = 0; c < e; ++c) out[c] = std::fma(s[i], v[c], out[c]);
    }
    const float share = kept[h] / total[h];
    for (int64_t c = 0; c < e; ++c) out[c] = std::fma(out[c], share, (1.f - kept[h]) * mean[c]);
  }
}



// The attention of every segment's queries (a row's H queries every query_stride floats, rows in segment
// order) at layer `layer` of their caches into out [rows, H, E], work-shared over all segments' tasks in
// one loop (one barrier a layer however many sequences). rank > 0: SparQ (rank, keep) where a segment's
// dense_from > 0.
void attend_team(const Segment* segments, int64_t count, int64_t layer, const float* q, int64_t query_stride,
                 int64_t heads, int64_t kv_heads, int64_t e, float scale, float* out, int64_t rank = 0,
                 int64_t keep = 0) {
  const int64_t group = heads / kv_heads;
#if SPECTR_SIMD
  constexpr int64_t MOST = SPECTR_VNNI ? 6 : 3;  // queries a task (their accumulators fill the vector registers)
#endif
  // A segment's tasks, in one of three kinds: SparQ, a group's heads at a token a task; transposed keys,
  // a key/value head's queries in pieces of up to MOST (below); else one query a task.
  enum Kind { SPARSE, TRANSPOSED, SINGLE };
  std::vector<int64_t> first_task(count + 1, 0), first_row(count + 1, 0), pieces(count, 0);
  std::vector<Kind> kinds(count);
  int64_t most_slots = 0;
  for (int64_t s = 0; s < count; ++s) {
    const Segment& seg = segments[s];
    const int64_t slots = seg.start + seg.tokens;
    most_slots = std::max(most_slots, slots);
    int64_t tasks;
    if (rank > 0 && seg.dense_from > 0) {
      kinds[s] = SPARSE;
      tasks = seg.tokens * kv_heads;
#if SPECTR_SIMD
    } else if (seg.keys_t != nullptr && e % 16 == 0) {
      // A key/value head's queries (its heads, for every token; token by token) in as few tasks of up to MOST
      // as hold them, each task one pass over the head's cache (at long contexts reading the cache is the
      // cost: measured, splitting one token's 3 queries over 2 passes to balance 3 heads on 2 threads made a
      // 4k-token step 45 % slower); one query a task for one token over a short cache, for balance. The same
      // bits whichever queries share a pass.
      kinds[s] = TRANSPOSED;
      const int64_t per_head = seg.tokens * group;
      pieces[s] = seg.tokens > 1 || slots >= 1024 ? (per_head + MOST - 1) / MOST : per_head;
      tasks = kv_heads * pieces[s];
#endif
    } else {
      kinds[s] = SINGLE;
      tasks = seg.tokens * heads;
    }
    first_task[s + 1] = first_task[s] + tasks;
    first_row[s + 1] = first_row[s] + seg.tokens;
  }
  // A thread's scratch lives on between calls: at 4k slots SparQ's is ~130 KB, which malloc would map and
  // unmap (page faults every layer).
  thread_local std::vector<float> kept_scratch;
  thread_local std::vector<int32_t> kept_seen;
  size_t need = std::max<size_t>(sparq_scratch(group, most_slots, e), most_slots + 16);
#if SPECTR_SIMD
  need = std::max<size_t>(need, MOST * (most_slots + 16));
#endif
  kept_scratch.resize(std::max(kept_scratch.size(), need));
  kept_seen.resize(std::max<size_t>(kept_seen.size(), most_slots));
  float* scratch = kept_scratch.data();
  int32_t* seen = kept_seen.data();
#pragma omp for schedule(static)
  for (int64_t task = 0; task < first_task[count]; ++task) {
    const int64_t s = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
    const Segment& seg = segments[s];
    const int64_t local = task - first_task[s], row0 = first_row[s], slots = seg.start + seg.tokens;
    const int64_t capacity = seg.capacity;
    const float* keys = seg.keys + layer * seg.layer_stride;
    const float* keys_t = seg.keys_t ? seg.keys_t + layer * seg.layer_stride_t : nullptr;
    const float* values = seg.values + layer * seg.layer_stride;
    if (kinds[s] == SPARSE) {
      const int64_t t = local / kv_heads, g = local % kv_heads;
      const float* queries[MOST_GROUP];
      float* outs[MOST_GROUP];
      for (int64_t i = 0; i < group; ++i) {
        queries[i] = q + (row0 + t) * query_stride + (g * group + i) * e;
        outs[i] = out + ((row0 + t) * heads + g * group + i) * e;
      }
      const Sparse sparse{rank, keep, seg.dense_from};
      sparq_group(queries, group, seg.mask + t * slots, keys_t ? keys_t + g * e * tiled(capacity) : nullptr,
                  keys + g * capacity * e, values + g * capacity * e, slots, e, sparse,
                  seg.value_means + layer * seg.mean_stride + g * e, scratch, outs);
      continue;
    }
#if SPECTR_SIMD
    if (kinds[s] == TRANSPOSED) {
      const int64_t g = local / pieces[s], piece = local % pieces[s], per_head = seg.tokens * group;
      const float* queries[MOST];
      const uint8_t* masks[MOST];
      float* outs[MOST];
      int nq = 0;
      for (int64_t i = piece * per_head / pieces[s]; i < (piece + 1) * per_head / pieces[s]; ++i, ++nq) {
        const int64_t t = i / group, h = g * group + i % group;
        queries[nq] = q + (row0 + t) * query_stride + h * e;
        masks[nq] = seg.mask + t * slots;
        outs[nq] = out + ((row0 + t) * heads + h) * e;
      }
      attend_queries_t(nq, queries, masks, keys_t + g * e * tiled(capacity), values + g * capacity * e, slots, e,
                       scale, scratch, outs);
      continue;
    }
#endif
    const int64_t t = local / heads, h = local % heads, g = h / group;
    const uint8_t* m = seg.mask + t * slots;
    int64_t n = 0;
    for (int64_t j = 0; j < slots; ++j)
      if (m[j]) seen[n++] = static_cast<int32_t>(j);
    attend_query(q + (row0 + t) * query_stride + h * e, keys + g * capacity * e, values + g * capacity * e, seen, n,
                 e, scale, scratch, out + ((row0 + t) * heads + h) * e);
  }
}

// The B batch rows of one cache layer ([B, G, capacity, E], keys_t [B, G, tiles, E, 16] or null), sharing a
// start and a mask [B, T, start + T], as segments.
std::vector<Segment> batch_segments(int64_t batch, int64_t tokens, float* keys, float* keys_t, float* values,
                                    int64_t layer_stride, int64_t layer_stride_t, int64_t kv_heads, int64_t e,
                                    int64_t capacity, int64_t start, const uint8_t* mask, int64_t dense_from,
                                    const float* value_means, int64_t mean_stride) {
  std::vector<Segment> segments(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t head = b * kv_heads;
    segments[b] = Segment{tokens, keys + head * capacity * e, keys_t ? keys_t + head * e * tiled(capacity) : nullptr,
                          values + head * capacity * e, layer_stride, layer_stride_t, capacity, start,
                          mask + b * tokens * (start + tokens), dense_from,
                          value_means ? value_means + head * e : nullptr, mean_stride};
  }
  return segments;
}

// RoPE in transformers' half-split convention, in place on [heads, E] for one token.
void rotate_heads(float* x, int64_t heads, int64_t e, const float* cos, const float* sin) {
  const int64_t half = e / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * e;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * cos[i] - b * sin[i];
      xh[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

}  // namespace

extern "C" {

int spectr_kernels_version() { return 12; }

// The block kernel this build runs: "avx512-vnni", "avx2" or "portable" (all take int8 or int16 activations).
// Whether this build's attention reads the keys transposed too (by tiles of 16 slots, [B, G, tiles, E, 16],
// beside [B, G, capacity, E]).
int spectr_transposed_keys() { return SPECTR_SIMD; }

// The largest head dim and group (query heads a key/value head) SparQ attention takes.
int64_t spectr_sparse_most_head_dim() { return MOST_HEAD_DIM; }
int64_t spectr_sparse_most_group() { return MOST_GROUP; }

const char* spectr_kernel_path() { return SPECTR_VNNI ? "avx512-vnni" : SPECTR_SIMD ? "avx2" : "portable"; }

// The row layout, what spectr_pack takes: codes (4-bit: [n, k/2] bytes, byte j of a block holding input j
// in its low nibble and j + 16 in its high one, GGUF's layout; 8-bit: [n, k] int8) and params [n, 2, P]
// float16: each row's block scales, then its block offsets, zero-padded to P = k/32 rounded up to a
// multiple of 8. spectr_pack writes the layout this build's kernel reads (the lanes layout with SIMD, else
// the row layout itself, codes then params) into out, spectr_packed_bytes(bits, n, k) bytes.
int64_t spectr_packed_bytes(int bits, int64_t n, int64_t k) {
#if SPECTR_SIMD
  return (n + LANES - 1) / LANES * (k / BLOCK) * lanes_block_bytes(bits);
#else
  return n * (bits == 4 ? k / 2 : k) + n * 2 * padded_blocks(k) * static_cast<int64_t>(sizeof(uint16_t));
#endif
}

void spectr_pack(const uint8_t* codes, const uint16_t* params, int bits, int64_t n, int64_t k, uint8_t* out) {
#if SPECTR_SIMD
  lanes_pack(codes, params, bits, n, k, out);
#else
  const int64_t code_bytes = n * (bits == 4 ? k / 2 : k);
  std::memcpy(out, codes, code_bytes);
  std::memcpy(out + code_bytes, params, n * 2 * padded_blocks(k) * sizeof(uint16_t));
#endif
}

// y [rows, n] = x [rows, k] @ W.T + bias for W [n, k] in 32-blocks, packed by spectr_pack. bias may be null.
void spectr_block_linear(const uint8_t* packed, int bits, int64_t n, int64_t k, const float* x, int64_t rows,
                         const float* bias, float* y, int activation_bits) {
  void* buffer = std::aligned_alloc(64, activation_bytes(rows, k));
  const Activations a = activations_in(buffer, rows, k);
  const BlockWeight w{packed, bias, bits, n, k, activation_bits};
#pragma omp parallel
  {
    quantize_team(x, a, w);
    linear_team(w, a, y, false);
  }
  std::free(buffer);
}

// out [B, T, H, E] = softmax(q . k / sqrt(E), where mask) . v for queries q [B, T, H, E] over the
// cache keys/values [B, G, capacity, E] (slots 0..S-1 in use), mask [B, T, S] (1: may attend).
// A query's result depends only on the keys and values it may attend, taken in slot order: the
// same bits whether the other slots are masked out or absent.
// keys_t: the same keys transposed by tiles of 16 slots, [B, G, tiled(capacity) / 16, E, 16], where
// spectr_transposed_keys() asks for them (or null).
//
// sparse_rank > 0 (and dense_from > 0): SparQ attention instead (see sparq_group), its approximate scores from
// sparse_rank components, sparse_keep of the slots before dense_from kept, value_mean [B, G, E] their mean
// value; scale is then 1 / sqrt(E).
void spectr_attend(const float* q, const float* keys, const float* keys_t, const float* values, const uint8_t* mask,
                   int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t e, int64_t capacity,
                   int64_t slots, float scale, float* out, int64_t sparse_rank, int64_t sparse_keep,
                   int64_t dense_from, const float* value_mean) {
  const std::vector<Segment> segments = batch_segments(
      batch, tokens, const_cast<float*>(keys), const_cast<float*>(keys_t), const_cast<float*>(values), 0, 0, kv_heads,
      e, capacity, slots - tokens, mask, sparse_rank > 0 ? dense_from : 0, value_mean, 0);
#pragma omp parallel
  attend_team(segments.data(), batch, 0, q, heads * e, heads, kv_heads, e, scale, out, sparse_rank, sparse_keep);
}

// Decoder layers over x [rows, D] in place, each x += attention(norm(x)); x += mlp(norm(x)): layers[0..count-1]
// in order, in one parallel region (every step a team function, separated by its barrier). The rows are
// the segments' new tokens, segment by segment (each sequence's own cache, start and mask; see Segment):
// their keys and values go to slots start..start+tokens-1 of their cache; cos, sin [rows, E] are their
// rotary tables. Every step is row-wise or row-invariant, so a row's result is the same bits whichever
// segments share the pass. The layers share one shape. sparse_rank > 0: SparQ attention (a draft's; see
// spectr_attend) for the segments with dense_from > 0.
void spectr_decoder_layers(const DecoderLayer* layers, int64_t count, float* x, const float* cos, const float* sin,
                           const Segment* segments, int64_t segment_count, int64_t sparse_rank, int64_t sparse_keep) {
  const DecoderLayer* shape = layers;
  const int64_t d = shape->hidden, e = shape->head_dim;
  const int64_t h = shape->heads, g = shape->kv_heads, f = shape->ffn;
  const int64_t qkv_width = (h + 2 * g) * e;
  std::vector<int64_t> row_segment, row_token;  // which segment a row belongs to, and its token there
  for (int64_t s = 0; s < segment_count; ++s)
    for (int64_t t = 0; t < segments[s].tokens; ++t) row_segment.push_back(s), row_token.push_back(t);
  const int64_t rows = static_cast<int64_t>(row_segment.size());
  if (rows == 0) return;
  float* normed = static_cast<float*>(std::malloc(sizeof(float) * rows * (d + qkv_width + h * e + 3 * f)));
  float* qkv = normed + rows * d;
  float* attended = qkv + rows * qkv_width;
  float* gate_up = attended + rows * h * e;
  float* hidden = gate_up + rows * 2 * f;
  // One buffer for every linear layer's quantized input: each is quantized after the last reader of
  // the one before has passed a barrier.
  void* buffer = std::aligned_alloc(64, activation_bytes(rows, std::max(std::max(d, h * e), f)));
  const Activations for_d = activations_in(buffer, rows, d), for_attended = activations_in(buffer, rows, h * e),
                    for_hidden = activations_in(buffer, rows, f);
  constexpr int64_t CHUNK = 256;  // of the MLP's hidden units, for the element-wise step
  const int64_t chunks = (f + CHUNK - 1) / CHUNK;
#pragma omp parallel
  for (int64_t index = 0; index < count; ++index) {
    const DecoderLayer* layer = layers + index;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * d, d, layer->attention_norm, layer->eps, normed + r * d);
    quantize_team(normed, for_d, layer->qkv);
    linear_team(layer->qkv, for_d, qkv, false);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const Segment& seg = segments[row_segment[row]];
      const int64_t at = seg.start + row_token[row], capacity = seg.capacity;
      float* layer_keys = seg.keys + index * seg.layer_stride;
      float* layer_keys_t = seg.keys_t ? seg.keys_t + index * seg.layer_stride_t : nullptr;
      float* layer_values = seg.values + index * seg.layer_stride;
      float* q = qkv + row * qkv_width;
      float* k = q + h * e;
      const float* v = k + g * e;
      rotate_heads(q, h, e, cos + row * e, sin + row * e);
      rotate_heads(k, g, e, cos + row * e, sin + row * e);
      for (int64_t j = 0; j < g; ++j) {
        const int64_t slot = (j * capacity + at) * e;
        std::memcpy(layer_keys + slot, k + j * e, sizeof(float) * e);
        std::memcpy(layer_values + slot, v + j * e, sizeof(float) * e);
        if (layer_keys_t) {
          float* tile = layer_keys_t + (j * tiled(capacity) + at / 16 * 16) * e + at % 16;
          for (int64_t l = 0; l < e; ++l) tile[l * 16] = k[j * e + l];
        }
      }
    }
    attend_team(segments, segment_count, index, qkv, qkv_width, h, g, e, 1.f / std::sqrt(static_cast<float>(e)),
                attended, sparse_rank, sparse_keep);
    quantize_team(attended, for_attended, layer->output);
    linear_team(layer->output, for_attended, x, true);

#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * d, d, layer->mlp_norm, layer->eps, normed + r * d);
    quantize_team(normed, for_d, layer->gate_up);
    linear_team(layer->gate_up, for_d, gate_up, false);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < rows * chunks; ++c) {
      const int64_t r = c / chunks, i0 = c % chunks * CHUNK;
      silu_times(gate_up + r * 2 * f + i0, gate_up + r * 2 * f + f + i0, std::min(CHUNK, f - i0), hidden + r * f + i0);
    }
    quantize_team(hidden, for_hidden, layer->down);
    linear_team(layer->down, for_hidden, x, true);  // its barrier: x is whole before the next layer reads it
  }
  std::free(buffer);
  std::free(normed);
}

}  // extern "C"
