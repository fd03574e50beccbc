// Parallel drivers of the direct kernels, included once per ISA after lns_direct.h (no
// include guard on purpose). Every output is summed by one thread in k order, so the bits
// do not depend on the thread count.

// Which product (see product_float): split fields read 2^(F+1) - 1 table entries, one
// permute holds 16 (AVX-512) or 8 (AVX2); AVX2 with F = 3 uses shifted fields.
inline int float_mode(const DirectArgs& a) {
  if (!a.split) return 2;
  return a.F > (V::lanes == 16 ? 3 : 2) ? 1 : 0;
}

// Tasks are chunks of MC rows (times a split of the column blocks when there are few
// chunks); each builds its rows' pairs once into thread-local buffers, runs every block it
// owns, and hands the sums to the sink.
template <int NV>
inline void rows_nv(const DirectArgs& a, const RowSource& src, const RowSink& sink, int64_t M, int64_t groups,
                    int64_t Kg, const int32_t* wpack, int64_t Ng) {
  constexpr int64_t NB = NV * V::lanes, MC = 32;
  const int64_t nblocks = (Ng + NB - 1) / NB, blocks = groups * nblocks, mchunks = (M + MC - 1) / MC;
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t splits = std::min(blocks, std::max<int64_t>(1, (want + mchunks - 1) / mchunks));
  const int64_t per_split = (blocks + splits - 1) / splits;
  at::parallel_for(0, mchunks * splits, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<int32_t> pairs, counts;
    thread_local std::vector<float> sf;
    thread_local std::vector<int64_t> si;
    thread_local std::vector<int64_t> cursor;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mc = t / splits, sp = t % splits;
      const int64_t m0 = mc * MC, m1 = std::min(M, m0 + MC), rows = m1 - m0;
      const int64_t b0 = sp * per_split, b1 = std::min(blocks, b0 + per_split);
      if (b0 >= b1) continue;
      const int S = src.entry();
      pairs.resize(size_t(S * rows * groups * Kg) + S);
      counts.resize(size_t(rows * groups) + 1);
      src.build(m0, m1, pairs.data(), counts.data());
      // Columns [n0, n1) of this split: consecutive blocks cover consecutive outputs.
      const int64_t n0 = (b0 / nblocks) * Ng + (b0 % nblocks) * NB;
      const int64_t last = b1 - 1, n1 = (last / nblocks) * Ng + std::min(Ng, (last % nblocks + 1) * NB);
      const int64_t width = n1 - n0;
      if (a.fixed) si.assign(size_t(rows * width), 0); else sf.assign(size_t(rows * width), 0.0f);
      // K in spans of KC, so that the KC weight rows of a span stay in L1 for every row.
      constexpr int64_t KC = std::max<int64_t>(16, 6144 / NB);
      alignas(64) float accf[NB] = {};
      alignas(64) int64_t acci[NB] = {};
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t g = bi / nblocks, b = bi % nblocks;
        const int32_t* wp = wpack + bi * Kg * NB * (a.pair ? 2 : 1);
        const int64_t c0 = g * Ng + b * NB - n0;
        const int cols = int(std::min(NB, Ng - b * NB));
        cursor.assign(size_t(rows), 0);
        for (int64_t k0 = 0; k0 < Kg; k0 += KC) {
          const int32_t k_end = int32_t(std::min(Kg, k0 + KC));
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t seg = r * groups + g;
            const int32_t* p = pairs.data() + S * seg * Kg;
            if (cursor[r] >= counts[seg] || p[S * cursor[r]] >= k_end) continue;
            if (a.pair) {
              const int64_t e = cursor[r], cnt = counts[seg];
              if (!a.fixed) {
                float* row = sf.data() + r * width + c0;
                std::copy(row, row + cols, accf);
                cursor[r] = a.sigma != 0.0f
                                ? direct::rows_span_pair<NV, false, true>(a, p, e, cnt, k_end, wp, accf, nullptr)
                                : direct::rows_span_pair<NV, false, false>(a, p, e, cnt, k_end, wp, accf, nullptr);
                std::copy(accf, accf + cols, row);
                continue;
              }
              int64_t* row = si.data() + r * width + c0;
              std::copy(row, row + cols, acci);
              switch (int(a.saturate || a.clamp_T) * 2 + int(a.sigma != 0.0f)) {
                case 0: cursor[r] = direct::rows_span_pair<NV, false, false>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 1: cursor[r] = direct::rows_span_pair<NV, false, true>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 2: cursor[r] = direct::rows_span_pair<NV, true, false>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                default: cursor[r] = direct::rows_span_pair<NV, true, true>(a, p, e, cnt, k_end, wp, nullptr, acci);
              }
              std::copy(acci, acci + cols, row);
              continue;
            }
            if (a.fixed) {
              int64_t* row = si.data() + r * width + c0;
              std::copy(row, row + cols, acci);
              const int64_t e = cursor[r], cnt = counts[seg];
              const bool any = a.saturate || a.clamp_T || a.zeros;
              switch (float_mode(a) * 2 + any) {  // the same modes as the float kernels
                case 0: cursor[r] = direct::rows_span<NV, false, false, false, 0>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 1: cursor[r] = direct::rows_span<NV, true, true, true, 0>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 2: cursor[r] = direct::rows_span<NV, false, false, false, 1>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 3: cursor[r] = direct::rows_span<NV, true, true, true, 1>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                case 4: cursor[r] = direct::rows_span<NV, false, false, false, 2>(a, p, e, cnt, k_end, wp, nullptr, acci); break;
                default: cursor[r] = direct::rows_span<NV, true, true, true, 2>(a, p, e, cnt, k_end, wp, nullptr, acci);
              }
              std::copy(acci, acci + cols, row);
            } else {
              float* row = sf.data() + r * width + c0;
              std::copy(row, row + cols, accf);
              const int64_t e = cursor[r], cnt = counts[seg];
              switch (float_mode(a) * 2 + a.zeros) {
                case 0: cursor[r] = direct::rows_span<NV, false, false, false, 0>(a, p, e, cnt, k_end, wp, accf, nullptr); break;
                case 1: cursor[r] = direct::rows_span<NV, true, false, false, 0>(a, p, e, cnt, k_end, wp, accf, nullptr); break;
                case 2: cursor[r] = direct::rows_span<NV, false, false, false, 1>(a, p, e, cnt, k_end, wp, accf, nullptr); break;
                case 3: cursor[r] = direct::rows_span<NV, true, false, false, 1>(a, p, e, cnt, k_end, wp, accf, nullptr); break;
                case 4: cursor[r] = direct::rows_span<NV, false, false, false, 2>(a, p, e, cnt, k_end, wp, accf, nullptr); break;
                default: cursor[r] = direct::rows_span<NV, true, false, false, 2>(a, p, e, cnt, k_end, wp, accf, nullptr);
              }
              std::copy(accf, accf + cols, row);
            }
          }
        }
      }
      sink.store(m0, m1, n0, n1, a.fixed ? nullptr : sf.data(), a.fixed ? si.data() : nullptr);
    }
  });
}

inline void rows(const DirectArgs& a, const RowSource& src, const RowSink& sink, int64_t M, int64_t groups, int64_t Kg,
                 const int32_t* wpack, int64_t Ng, int64_t NB) {
  switch (NB / V::lanes) {
    case 1:
      return rows_nv<1>(a, src, sink, M, groups, Kg, wpack, Ng);
    case 2:
      return rows_nv<2>(a, src, sink, M, groups, Kg, wpack, Ng);
    case 4:
      return rows_nv<4>(a, src, sink, M, groups, Kg, wpack, Ng);
    default:
      if constexpr (V::lanes == 16) return rows_nv<8>(a, src, sink, M, groups, Kg, wpack, Ng);
      TORCH_CHECK(false, "torchlns: bad direct block");
  }
}

constexpr int kColsNV = V::lanes == 16 ? 2 : 4;

// Tasks (runs of positions) outermost and their outputs n innermost, so that one run's x
// fields stay in cache for every n of its group.
inline void cols(const DirectArgs& a, const ColSource& src, int64_t groups, int64_t Kg, const int32_t* w, int64_t Ng,
                 float* yf, int64_t* yi) {
  const int64_t N = groups * Ng, tasks = src.tasks();
  at::parallel_for(0, tasks * groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const int32_t*> xk(size_t(Kg) + 1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t task = t / groups, g = t % groups;
      const int count = src.x_at(task, g, xk.data());
      if (count <= 0) continue;  // a source whose groups have fewer runs than others
      for (int64_t n = g * Ng; n < (g + 1) * Ng; ++n) {
        const int64_t out = src.out_at(task, n);
        float* of = yf ? yf + out : nullptr;
        int64_t* oi = yi ? yi + out : nullptr;
        const int32_t* wn = w + n * Kg * (a.pair ? 2 : 1);
        const bool sat = a.fixed && (a.saturate || a.clamp_T);
        if (a.pair) {
          const int64_t d = src.tail_delta;
          switch (int(sat) * 2 + int(a.sigma != 0.0f)) {
            case 0: direct::cols_tile_pair<kColsNV, false, false>(a, xk.data(), d, Kg, wn, count, of, oi); break;
            case 1: direct::cols_tile_pair<kColsNV, false, true>(a, xk.data(), d, Kg, wn, count, of, oi); break;
            case 2: direct::cols_tile_pair<kColsNV, true, false>(a, xk.data(), d, Kg, wn, count, of, oi); break;
            default: direct::cols_tile_pair<kColsNV, true, true>(a, xk.data(), d, Kg, wn, count, of, oi);
          }
          continue;
        }
        switch (float_mode(a) * 2 + sat) {
          case 0: direct::cols_tile<kColsNV, false, false, 0>(a, xk.data(), Kg, wn, count, of, oi); break;
          case 1: direct::cols_tile<kColsNV, true, true, 0>(a, xk.data(), Kg, wn, count, of, oi); break;
          case 2: direct::cols_tile<kColsNV, false, false, 1>(a, xk.data(), Kg, wn, count, of, oi); break;
          case 3: direct::cols_tile<kColsNV, true, true, 1>(a, xk.data(), Kg, wn, count, of, oi); break;
          case 4: direct::cols_tile<kColsNV, false, false, 2>(a, xk.data(), Kg, wn, count, of, oi); break;
          default: direct::cols_tile<kColsNV, true, true, 2>(a, xk.data(), Kg, wn, count, of, oi);
        }
      }
    }
  });
  (void)N;
}
