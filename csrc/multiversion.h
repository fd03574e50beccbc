// Portable builds with fast paths.
//
// The package is compiled without -march=native, so that it runs on any x86-64. Hot
// loops are compiled several times instead (GCC/Clang target_clones) and the loader
// picks the best clone the CPU supports: x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3
// (AVX2/FMA), or the x86-64 baseline.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TORCHLNS_NO_MULTIVERSION)
#define TORCHLNS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHLNS_MULTIVERSION
#endif

#define TORCHLNS_INLINE inline __attribute__((always_inline))
