// Interface of the direct LNS MAC kernels (see Note: direct kernels in lns_direct.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace torchlns {

// The field of a zero (or NaN) code: a flag alone, and the mask that finds it in a sum of
// two fields, per layout (see Note: direct kernels): shifted fields keep it in bits 2-3,
// split float fields in bits 16-17, split fixed fields in bits 7-8.
constexpr int32_t kZeroField = 4, kZeroFlags = 12;
constexpr int32_t kZeroFieldSplit = 1 << 16, kZeroFlagsSplit = 3 << 16;
constexpr int32_t kZeroFieldFixed = 1 << 7, kZeroFlagsFixed = 3 << 7;

struct DirectArgs {
  bool fixed;
  int F;
  int32_t T;             // fixed: 2^(W-1) - 1
  int64_t chunk;         // fixed: products summed in int32 lanes before they spill to int64
  bool saturate;         // fixed: some product may exceed 2^31 (test for a < 0)
  bool clamp_T;          // fixed: some product may exceed T (W < 32)
  bool zeros;            // rows: the weights hold zero codes (test the flags)
  int32_t zero_field, zero_flags;
  bool split;            // split fields (else shifted; see Note: direct kernels)
  int32_t sign_mask;     // the sign bit of a field sum
  const int32_t* table;  // 32 entries, 64-byte aligned (see Note: direct kernels)
  // Product pairs (see Note: product pairs in lns_direct.h): operands are (head, tail) floats.
  bool pair = false;
  float sigma = 0.0f;      // LUT conversions: 2^(23 - P) + 1, rounds a product to P + 1 bits; 0: none
  float sat_bound = 0.0f;  // fixed: 2^(W-1), where a product's magnitude saturates to T
};

// Product pairs: the float32 head D[r] and tail 2^(r/2^F) - D[r] of every remainder, as
// float32 bits at octave 0, for packing; and what the exactness proof found.
struct PairTables {
  bool ok = false;
  float sigma = 0.0f;  // as in DirectArgs
  int emin = 0;        // the lowest binary exponent of any nonzero intermediate at octave 0
  std::vector<int32_t> head, tail;
};
// The pair tables for the conversion table C (2^F float64 values), or ok = false when the
// pair kernels cannot reproduce C bit for bit (Mitchell's, or a hand-made table).
const PairTables& pair_tables(const double* C, int frac_bits);

struct DirectTables {
  bool ok = false;  // the table fits the kernels
  int P = 0;        // fixed: fraction bits of L
  int64_t L_max = 0;
  alignas(64) int32_t table[32] = {};
};
// split: the float table E[t] for split fields, else the mantissas of C[r] for shifted fields.
DirectTables direct_tables(const double* C, int frac_bits, bool fixed, bool split = true);

// field = (uint32(negate ? -g : g) + add) << shift + sign << sign_bit, or with split:
// (uint32(negate ? -q : q) + add) << shift + r + sign << sign_bit for g = q 2^F + r (see
// Note: direct kernels).
// Product pairs: head = bits(pair->head[r]) + (q + add) << 23 and tail likewise (0 for a
// zero tail), both with the code's sign; zero and NaN codes are 0.
struct FieldLayout {
  bool negate;
  uint32_t add;
  int shift;
  int sign_bit;
  bool split = false;
  int32_t zero_field = kZeroField;  // and, next, the mask that finds it in a sum of two fields
  int32_t zero_flags = kZeroFlags;
  const PairTables* pair = nullptr;
};

// Fields of a tensor of codes, same shape (kZeroField for the zero and NaN codes); the NaN
// map (when there is a NaN); the octave range of the nonzero codes (of g, before the layout's transformation).
struct PackedFields {
  at::Tensor fields;  // int32; undefined when the fields went to a caller's buffer
  at::Tensor nan;     // bool, defined only when any_nan
  int32_t q_lo, q_hi;
  bool any_nan;
};
// dst: the caller's buffer for the fields (else a new tensor); nhwc: (N, C, H, W) codes
// packed in (N, H, W, C) order. Product pairs write the heads to dst[0, n) and the tails to
// dst[n, 2n) (a new tensor: 2n values).
PackedFields packed_fields(const at::Tensor& codes, const at::Tensor& offset, int64_t bits, int frac_bits,
                           const FieldLayout& layout, int32_t* dst = nullptr, bool nhwc = false);

// A scratch buffer of this thread that outlives the call (slot 0..3): large per-call buffers
// would be page-faulted in afresh on every call, which costs more than small layers do.
int32_t* scratch(int slot, int64_t elements);

bool direct_supported(int frac_bits);  // the active ISA has table kernels for this F
bool direct_pairs_supported();         // the active ISA has the product-pair kernels (any F <= 10)
int direct_lanes();
int64_t direct_block(int64_t Ng);  // weight columns per packed block for Ng outputs per group

// rows: the caller supplies the operand and takes the sums, a chunk of rows at a time:
// build() writes, for rows [m0, m1) and every group g, counts[(m - m0) * groups + g] (k,
// field) pairs of the row's non-zero x fields at pairs + 2 * ((m - m0) * groups + g) * Kg;
// store() receives the sums of those rows for columns [n0, n1) (row stride n1 - n0), float
// or int64. wpack is [group][block][Kg][NB] weight fields (Ng outputs per group, padded
// with kZeroField).
// Product pairs: entries are (k, head, tail) triples, the tail from the same element of the
// fields at tails - fields further on.
struct RowSource {
  virtual void build(int64_t m0, int64_t m1, int32_t* pairs, int32_t* counts) const = 0;
  virtual ~RowSource() = default;
  int64_t tail_delta = 0;  // product pairs: where an element's tail is, from its head; 0: no tails
  int entry() const { return tail_delta ? 3 : 2; }
};
struct RowSink {
  virtual void store(int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* sf, const int64_t* si) const = 0;
  virtual ~RowSink() = default;
};
void direct_rows(const DirectArgs& a, const RowSource& src, const RowSink& sink, int64_t M, int64_t groups, int64_t Kg,
                 const int32_t* wpack, int64_t Ng, int64_t NB);
// columns: tasks are (task, n) for n in [0, N); x_at(task, k, xk) fills xk[k] for every k
// of n's group with where that task's run of positions starts, and returns the number of
// positions (at most direct_cols_run()); the sums go to yf / yi + out_at(task, n).
// Product pairs: the tails lie tail_delta elements after the heads that xk points at, and
// the weight row of n is Kg heads then Kg tails.
struct ColSource {
  int64_t tail_delta = 0;
  virtual int64_t tasks() const = 0;
  virtual int x_at(int64_t task, int64_t group, const int32_t** xk) const = 0;
  virtual int64_t out_at(int64_t task, int64_t n) const = 0;
  virtual ~ColSource() = default;
};
void direct_cols(const DirectArgs& a, const ColSource& src, int64_t groups, int64_t Kg, const int32_t* w, int64_t Ng,
                 float* yf, int64_t* yi);
int64_t direct_cols_run();  // positions per task (the lanes of the columns kernel)

}  // namespace torchlns
