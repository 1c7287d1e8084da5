// The loss of the global batch from the ranks' summed partial vector (crl_ops.distributed) and its
// gradient: semantics section 3's reduction, through term_weights as the single process's loss
// (cpu::loss). Host+device and one attribute at a time: the CPU loops over the attributes, a CUDA
// block gives each a thread (cuda/losses.cu), and both round alike.
#pragma once

#include "common/crl_math.h"

namespace crl {

// The pieces of crl_ops.distributed's partial sums vector (op_schemas.h), all float64: pair_sums'
// output, the pair counts [A, 4] and three flags (an overflowing pair distance, non-finite logits,
// non-finite features or logits).
struct PartialLayout {
  Form form;
  int64_t attributes, bins;

  CRL_HD int64_t sums() const { return form == Form::Distribution ? 2 * attributes * bins : 2 * attributes; }
  CRL_HD int64_t counts() const { return sums(); }  // offset of the pair counts
  CRL_HD int64_t flags() const { return sums() + 4 * attributes; }
  CRL_HD int64_t size() const { return flags() + 3; }
};

// The flags' positions after layout.flags().
constexpr int kOverflowFlag = 0, kLogitsFlag = 1, kFeaturesFlag = 2;

// Entry e of a rank's partial vector: pair_sums' output (sums, Acc), its pair counts [A, 4], then
// its flags: overflow (0-dim) and checks [2] (non-finite logits; non-finite features or logits).
template <typename Acc>
CRL_HD double partial_entry(int64_t e, const PartialLayout& layout, const Acc* sums, const int64_t* counts,
                            const bool* overflow, const bool* checks) {
  if (e < layout.counts()) return static_cast<double>(sums[e]);
  if (e < layout.flags()) return static_cast<double>(counts[e - layout.counts()]);
  const int64_t flag = e - layout.flags();
  return (flag == kOverflowFlag ? *overflow : checks[flag - kLogitsFlag]) ? 1.0 : 0.0;
}

// Whether any rank set a flag: the loss, the gradient scale and every gradient entry are then NaN.
CRL_HD bool partial_failed(const double* total, const PartialLayout& layout) {
  const double* flags = total + layout.flags();
  return flags[0] > 0 || flags[1] > 0 || flags[2] > 0;
}

// Attribute j's pair counts [4] (float64 sums of integers below 2^53: exact).
CRL_HD void partial_counts(const double* total, const PartialLayout& layout, int64_t j, int64_t* counts) {
  for (int c = 0; c < 4; ++c) counts[4 * j + c] = static_cast<int64_t>(total[layout.counts() + 4 * j + c]);
}

// Attribute j's two terms, sums[2 j] and sums[2 j + 1], as cpu::loss weighs them: relative and
// absolute, pair_sums' columns; distribution, the overlap of the histograms normalised by the pair
// counts (0 without both pair kinds), and 0.
template <typename Acc>
CRL_HD void attribute_terms(const double* total, const PartialLayout& layout, const int64_t* counts, int64_t j,
                            Acc* sums) {
  if (layout.form != Form::Distribution) {
    sums[2 * j] = static_cast<Acc>(total[2 * j]);
    sums[2 * j + 1] = static_cast<Acc>(total[2 * j + 1]);
    return;
  }
  const int64_t n_pos = counts[4 * j + kPositivesColumn], n_neg = counts[4 * j + kNegativesColumn];
  const double* h_pos = total + j * 2 * layout.bins;
  const double* h_neg = h_pos + layout.bins;
  Acc cumulative = Acc(0), overlap = Acc(0);  // histogram_overlap on the normalised histograms
  for (int64_t t = 0; t < layout.bins; ++t) {
    cumulative += static_cast<Acc>(h_neg[t]) / static_cast<Acc>(n_neg > 0 ? n_neg : 1);
    overlap += static_cast<Acc>(h_pos[t]) / static_cast<Acc>(n_pos > 0 ? n_pos : 1) * cumulative;
  }
  sums[2 * j] = n_pos > 0 && n_neg > 0 ? overlap : Acc(0);
  sums[2 * j + 1] = Acc(0);
}

// The loss: the weighted terms in attribute order (cpu::loss's sum).
template <typename Acc>
CRL_HD Acc weighted_terms(Form form, const Acc* sums, const Acc* weights, int64_t attributes) {
  Acc total = Acc(0);
  for (int64_t j = 0; j < attributes; ++j) {
    total += weights[2 * j] * sums[2 * j];
    if (form == Form::Absolute) total += weights[2 * j + 1] * sums[2 * j + 1];
  }
  return total;
}

// d loss / d (attribute j's entries of pair_sums' part of the partial vector), times grad, into
// out (float64): relative and absolute, grad times the terms' weights; distribution, through the
// normalised histograms' overlap (histogram_overlap_gradient), each divided by its pair count.
template <typename Acc>
CRL_HD void attribute_terms_gradient(Acc grad, const double* total, const PartialLayout& layout, const int64_t* counts,
                                     const Acc* weights, int64_t j, double* out) {
  if (layout.form != Form::Distribution) {
    out[2 * j] = static_cast<double>(grad * weights[2 * j]);
    out[2 * j + 1] = layout.form == Form::Absolute ? static_cast<double>(grad * weights[2 * j + 1]) : 0.0;
    return;
  }
  const int64_t n_pos = counts[4 * j + kPositivesColumn], n_neg = counts[4 * j + kNegativesColumn];
  const int64_t bins = layout.bins;
  const double* h_pos = total + j * 2 * bins;
  const double* h_neg = h_pos + bins;
  double* g_pos = out + j * 2 * bins;
  double* g_neg = g_pos + bins;
  if (n_pos == 0 || n_neg == 0) {
    for (int64_t t = 0; t < 2 * bins; ++t) g_pos[t] = 0.0;
    return;
  }
  const Acc pos_factor = grad * weights[2 * j] / static_cast<Acc>(n_pos);
  const Acc neg_factor = grad * weights[2 * j] / static_cast<Acc>(n_neg);
  Acc forward = Acc(0), backward = Acc(0);
  for (int64_t t = 0; t < bins; ++t) {
    forward += static_cast<Acc>(h_neg[t]) / static_cast<Acc>(n_neg);
    g_pos[t] = static_cast<double>(pos_factor * forward);
  }
  for (int64_t t = bins - 1; t >= 0; --t) {
    backward += static_cast<Acc>(h_pos[t]) / static_cast<Acc>(n_pos);
    g_neg[t] = static_cast<double>(neg_factor * backward);
  }
}

}  // namespace crl
