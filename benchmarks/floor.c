/* Plain loops whose rates, measured in the same run as the benchmark, give its arithmetic floors
 * (benchmarks/floor.py). Each is the loop a programmer would write, left to the compiler's
 * vectoriser: no blocking, no intrinsics. Each returns a value that depends on all its work, so
 * that none of it is optimised away. */
#include <math.h>

/* For each of `count` anchors [count, dim], the squared distances to n candidates laid out
 * [dim, n] (candidate t's value d at x[d * n + t]): out[t] += (a_d - x_dt)^2 over d, in order of
 * d, vectorised across the candidates. */
float crl_floor_distances(const float* x, const float* anchors, long count, long dim, long n, float* out) {
  float sink = 0.0f;
  for (long a = 0; a < count; ++a) {
    for (long t = 0; t < n; ++t) out[t] = 0.0f;
    for (long d = 0; d < dim; ++d) {
      const float value = anchors[a * dim + d];
      const float* row = x + d * n;
      for (long t = 0; t < n; ++t) {
        const float diff = value - row[t];
        out[t] += diff * diff;
      }
    }
    sink += out[a % n];
  }
  return sink;
}

/* The sum of expf over n values (the C library's expf, as the CPU kernels call it). */
float crl_floor_exp(const float* x, long n) {
  float sum = 0.0f;
  for (long i = 0; i < n; ++i) sum += expf(x[i]);
  return sum;
}

/* A streaming read of n floats (n a multiple of 16), into 16 independent partial sums. */
float crl_floor_read(const float* x, long n) {
  float partial[16] = {0.0f};
  for (long i = 0; i < n; i += 16) {
    for (int l = 0; l < 16; ++l) partial[l] += x[i + l];
  }
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += partial[l];
  return sum;
}
