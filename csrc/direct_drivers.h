// Parallel drivers of the direct kernels, included once per ISA after lns_direct.h (no
// include guard on purpose). Every output is summed by one thread in k order, so the bits
// do not depend on the thread count.

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
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mc = t / splits, sp = t % splits;
      const int64_t m0 = mc * MC, m1 = std::min(M, m0 + MC), rows = m1 - m0;
      const int64_t b0 = sp * per_split, b1 = std::min(blocks, b0 + per_split);
      if (b0 >= b1) continue;
      pairs.resize(size_t(2 * rows * groups * Kg) + 2);
      counts.resize(size_t(rows * groups) + 1);
      src.build(m0, m1, pairs.data(), counts.data());
      // Columns [n0, n1) of this split: consecutive blocks cover consecutive outputs.
      const int64_t n0 = (b0 / nblocks) * Ng + (b0 % nblocks) * NB;
      const int64_t last = b1 - 1, n1 = (last / nblocks) * Ng + std::min(Ng, (last % nblocks + 1) * NB);
      const int64_t width = n1 - n0;
      if (a.fixed) si.assign(size_t(rows * width), 0); else sf.assign(size_t(rows * width), 0.0f);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t g = bi / nblocks, b = bi % nblocks;
        const int32_t* wp = wpack + bi * Kg * NB;
        const int64_t c0 = g * Ng + b * NB - n0;
        const int cols = int(std::min(NB, Ng - b * NB));
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t seg = r * groups + g;
          const int32_t* p = pairs.data() + 2 * seg * Kg;
          float* of = a.fixed ? nullptr : sf.data() + r * width + c0;
          int64_t* oi = a.fixed ? si.data() + r * width + c0 : nullptr;
          if (!a.fixed)
            a.zeros ? direct::rows_row<NV, true, false, false>(a, p, counts[seg], wp, of, oi, cols)
                    : direct::rows_row<NV, false, false, false>(a, p, counts[seg], wp, of, oi, cols);
          else if (a.saturate || a.clamp_T || a.zeros)
            direct::rows_row<NV, true, true, true>(a, p, counts[seg], wp, of, oi, cols);
          else
            direct::rows_row<NV, false, false, false>(a, p, counts[seg], wp, of, oi, cols);
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

inline void cols(const DirectArgs& a, const int32_t* xt, int64_t imgs, int64_t L, int64_t groups, int64_t Kg,
                 const int32_t* w, int64_t Ng, float* yf, int64_t* yi) {
  constexpr int NV = V::lanes == 16 ? 2 : 4;
  constexpr int64_t LB = NV * V::lanes;
  const int64_t N = groups * Ng, lblocks = (L + LB - 1) / LB;
  at::parallel_for(0, imgs * N * lblocks, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lb = t % lblocks, n = (t / lblocks) % N, img = t / (lblocks * N);
      const int32_t* xg = xt + (img * groups + n / Ng) * Kg * L;
      const int64_t l0 = lb * LB, out = (img * N + n) * L + l0;
      const int count = int(std::min(LB, L - l0));
      float* of = yf ? yf + out : nullptr;
      int64_t* oi = yi ? yi + out : nullptr;
      if (a.fixed && (a.saturate || a.clamp_T))
        direct::cols_tile<NV, true, true>(a, xg, L, Kg, w + n * Kg, l0, count, of, oi);
      else
        direct::cols_tile<NV, false, false>(a, xg, L, Kg, w + n * Kg, l0, count, of, oi);
    }
  });
}
