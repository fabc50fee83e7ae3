// Branch-free exp and log that GCC/Clang auto-vectorise inside `#pragma omp simd`
// loops (libm's expf/logf are scalar calls unless -ffast-math, which we avoid
// because it breaks NaN/inf handling).
//
// exp: x = n*ln2 + r with |r| <= ln2/2, exp(r) by a Taylor polynomial, 2^n built
// from the exponent bits. Inputs below the smallest normal result flush to +0
// (denormals are never produced); inputs above log(max) saturate to +inf.
// log: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| <= 0.172. log(0) = -inf, log(x<0) = NaN.
// Accuracy (measured in tests against libm): <= 2 ulp in float, <= 4 ulp in double.
#pragma once

#include <cstdint>
#include <limits>

namespace selflabel {

template <typename T> struct FloatBits;
template <> struct FloatBits<float> {
  using Int = int32_t;
  static constexpr int kMantissa = 23;
  static constexpr Int kBias = 127;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kExpLo = -87.33f;      // exp(x) < FLT_MIN below this: flush to 0
  static constexpr float kExpHi = 88.72f;       // exp(x) > FLT_MAX above this
};
template <> struct FloatBits<double> {
  using Int = int64_t;
  static constexpr int kMantissa = 52;
  static constexpr Int kBias = 1023;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kExpLo = -708.39;
  static constexpr double kExpHi = 709.78;
};

// __builtin_bit_cast (GCC >= 11, Clang) keeps these in registers inside `omp simd`
// loops; std::memcpy through a local makes GCC spill each lane and gather.
template <typename T>
inline typename FloatBits<T>::Int to_bits(T x) {
  return __builtin_bit_cast(typename FloatBits<T>::Int, x);
}

template <typename T>
inline T from_bits(typename FloatBits<T>::Int i) {
  return __builtin_bit_cast(T, i);
}

// By-value min/max: std::max takes references, which makes GCC spill the
// privatised lanes of `omp simd` reductions to memory and gather them back.
template <typename T>
inline T vmax(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
inline T vmin(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
inline T vexp(T x) {
  using B = FloatBits<T>;
  using Int = typename B::Int;
  constexpr T kLog2e = T(1.4426950408889634);
  constexpr T kLn2Hi = T(0.693145751953125);
  constexpr T kLn2Lo = T(1.428606820309417232e-06);
  const bool under = x < B::kExpLo;
  const bool over = x > B::kExpHi;
  const T xc = under ? T(0) : (over ? T(0) : x);  // keep the polynomial in range; fixed below
  const T kd = xc * kLog2e + B::kMagic;
  const T n = kd - B::kMagic;
  const Int ni = to_bits<T>(kd) - to_bits<T>(B::kMagic);
  const T r = (xc - n * kLn2Hi) - n * kLn2Lo;
  T p;
  if constexpr (sizeof(T) == 4) {
    p = T(1.0 / 5040);
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = T(1.0 / 6227020800.0);
    p = p * r + T(1.0 / 479001600.0);
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120.0);
    p = p * r + T(1.0 / 24.0);
    p = p * r + T(1.0 / 6.0);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  }
  const T scale = from_bits<T>((ni + B::kBias) << B::kMantissa);
  const T y = p * scale;
  return under ? T(0) : (over ? std::numeric_limits<T>::infinity() : y);
}

template <typename T>
inline T vlog(T x) {
  using B = FloatBits<T>;
  using Int = typename B::Int;
  constexpr T kLn2 = T(0.6931471805599453);
  constexpr T kTwoPowM = T(sizeof(T) == 4 ? 8388608.0 : 4503599627370496.0);  // 2^mantissa
  constexpr T kMinNormal = std::numeric_limits<T>::min();
  // Scale denormals into the normal range first.
  const bool denorm = x < kMinNormal;
  const T xs = denorm ? x * kTwoPowM : x;
  const Int bits = to_bits<T>(xs);
  // Split so that the mantissa lands in [sqrt(1/2), sqrt(2)).
  const Int sqrt_half_bits = to_bits<T>(T(0.70710678118654752));
  const Int off = bits - sqrt_half_bits;
  const Int e = off >> B::kMantissa;
  const Int mant_mask = (Int(1) << B::kMantissa) - 1;
  const T m = from_bits<T>((off & mant_mask) + sqrt_half_bits);
  const T s = (m - T(1)) / (m + T(1));
  const T s2 = s * s;
  T p;
  if constexpr (sizeof(T) == 4) {
    p = T(1.0 / 9);
    p = p * s2 + T(1.0 / 7);
    p = p * s2 + T(1.0 / 5);
    p = p * s2 + T(1.0 / 3);
    p = p * s2 + T(1);
  } else {
    p = T(1.0 / 21);
    p = p * s2 + T(1.0 / 19);
    p = p * s2 + T(1.0 / 17);
    p = p * s2 + T(1.0 / 15);
    p = p * s2 + T(1.0 / 13);
    p = p * s2 + T(1.0 / 11);
    p = p * s2 + T(1.0 / 9);
    p = p * s2 + T(1.0 / 7);
    p = p * s2 + T(1.0 / 5);
    p = p * s2 + T(1.0 / 3);
    p = p * s2 + T(1);
  }
  const T ef = T(e) - (denorm ? T(B::kMantissa) : T(0));
  const T y = ef * kLn2 + T(2) * s * p;
  const T inf = std::numeric_limits<T>::infinity();
  return x > T(0) ? (x < inf ? y : inf) : (x == T(0) ? -inf : std::numeric_limits<T>::quiet_NaN());
}

}  // namespace selflabel
