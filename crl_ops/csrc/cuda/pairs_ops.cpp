// CUDA pair ops at the level of tensors (cuda/stages.h): outputs, dtype dispatch and the
// launchers of pairs.cu. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/op_checks.h"
#include "cuda/kernels.h"
#include "cuda/stages.h"
#include "cuda/tensor_glue.h"

namespace crl {
namespace cuda {

namespace {

template <typename T>
PairVectors<T> vectors_of(const Tensor& vectors) {
  return {features_of<T>(vectors), vectors.size(0), vectors.size(1)};
}

PairRows rows_of(const Tensor& partners) {
  return {partners.size(0), partners.size(1), partners.size(2)};
}

// A contiguous tensor in dtype `type` (a copy only where it is not one).
Tensor contiguous_as(const Tensor& t, at::ScalarType type) {
  return as_type(t, type).contiguous();
}

}  // namespace

Tensor shard_table(const Tensor& vectors, const Tensor& lists, int64_t first) {
  const int64_t attributes = lists.size(0), slots = lists.size(1) * lists.size(2);
  Tensor table = at::empty({slots, attributes, vectors.size(2)}, vectors.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::shard_table", [&] {
    cuda::shard_table(vectors_of<scalar_t>(vectors), lists.data_ptr<int64_t>(), slots, attributes, first,
                      table.data_ptr<scalar_t>(), current_stream());
  });
  return table;
}

Tensor shard_table_backward(const Tensor& grad_table_in, const Tensor& grad_rows_in, const Tensor& lists,
                            int64_t first, const Tensor& grad_scale) {
  const auto type = grad_rows_in.scalar_type();
  const Tensor grad_rows = grad_rows_in.contiguous(), grad_table = contiguous_as(grad_table_in, type);
  const Tensor scale = as_type(grad_scale, type);
  Tensor grad = at::empty(grad_rows.sizes(), grad_rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "crl_ops::shard_table_backward", [&] {
    cuda::shard_table_backward(grad_table.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(),
                               lists.data_ptr<int64_t>(), lists.size(1) * lists.size(2), lists.size(0),
                               grad_rows.size(0), grad_rows.size(1), grad_rows.size(2), first,
                               scale.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), current_stream());
  });
  return grad;
}

std::tuple<Tensor, Tensor> pair_distances(const Tensor& vectors, const Tensor& partners, int64_t first) {
  const auto acc_type = accumulation_type(vectors.scalar_type());
  Tensor distances = at::empty(partners.sizes(), vectors.options().dtype(acc_type));
  Tensor overflow = at::empty({}, vectors.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::pair_distances", [&] {
    using acc = acc_t<scalar_t>;
    cuda::pair_distances<scalar_t, acc>(vectors_of<scalar_t>(vectors), partners.data_ptr<int64_t>(), partners.size(0),
                                        partners.size(1), partners.size(2), first, distances.data_ptr<acc>(),
                                        overflow.data_ptr<bool>(), current_stream());
  });
  return {distances, overflow};
}

Tensor pair_distances_backward(const Tensor& grad, const Tensor& vectors, const Tensor& partners,
                               const Tensor& distances, int64_t first) {
  at::globalContext().alertNotDeterministic("crl_ops::pair_distances_backward (CUDA: float atomics)");
  Tensor grad_vectors = at::zeros(vectors.sizes(), vectors.options().dtype(distances.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::pair_distances_backward",
                                  [&] {
    using acc = acc_t<scalar_t>;
    cuda::pair_distances_backward<scalar_t, acc>(vectors_of<scalar_t>(vectors), partners.data_ptr<int64_t>(),
                                                 distances.data_ptr<acc>(), grad.data_ptr<acc>(), partners.size(0),
                                                 partners.size(1), partners.size(2), first,
                                                 grad_vectors.data_ptr<acc>(), current_stream());
  });
  return grad_vectors.to(vectors.scalar_type());
}

Tensor pair_sums(const Tensor& distances, const Tensor& partners, const Tensor& margins_in, const Tensor& longest_in,
                 Form form, double apc_margin, int64_t bins) {
  const PairRows rows = rows_of(partners);
  const auto type = distances.scalar_type();
  Tensor sums = at::empty(pair_sums_shape(form, rows.attributes, bins), distances.options());
  const Tensor margins = contiguous_as(margins_in, type);
  const Tensor longest = form == Form::Distribution ? contiguous_as(longest_in, type) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(type, "crl_ops::pair_sums", [&] {
    const Tensor scratch = workspace(distances, pair_sums_workspace<scalar_t>(rows));
    cuda::pair_sums<scalar_t>(distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(), rows,
                              margins.data_ptr<scalar_t>(), longest.defined() ? longest.data_ptr<scalar_t>() : nullptr,
                              form, static_cast<scalar_t>(apc_margin), bins, sums.data_ptr<scalar_t>(),
                              scratch.data_ptr(), current_stream());
  });
  return sums;
}

std::tuple<Tensor, Tensor> pair_sums_backward(const Tensor& grad_in, const Tensor& distances, const Tensor& partners,
                                              const Tensor& margins_in, const Tensor& longest_in, Form form,
                                              double apc_margin, int64_t bins, bool margins_grad) {
  const PairRows rows = rows_of(partners);
  const auto type = distances.scalar_type();
  Tensor grad_d = at::zeros_like(distances);
  const Tensor grad = contiguous_as(grad_in, type), margins = contiguous_as(margins_in, type);
  const Tensor longest = form == Form::Distribution ? contiguous_as(longest_in, type) : Tensor();
  // unsigned 64-bit counters, held in an int64 tensor (same width)
  Tensor open = at::zeros({form == Form::Relative ? rows.attributes : 0}, partners.options());
  AT_DISPATCH_FLOATING_TYPES(type, "crl_ops::pair_sums_backward", [&] {
    cuda::pair_sums_backward<scalar_t>(
        grad.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(), partners.data_ptr<int64_t>(), rows,
        margins.data_ptr<scalar_t>(), longest.defined() ? longest.data_ptr<scalar_t>() : nullptr, form,
        static_cast<scalar_t>(apc_margin), bins, grad_d.data_ptr<scalar_t>(),
        form == Form::Relative ? reinterpret_cast<unsigned long long*>(open.data_ptr<int64_t>()) : nullptr,
        current_stream());
  });
  Tensor grad_margins = at::zeros({margins_grad ? rows.attributes : 0}, margins_in.options());
  if (margins_grad && form == Form::Relative) {  // d / d m_j: the gradient of a hinge times the open hinges
    grad_margins.copy_(grad.select(1, 0) * open.to(type));
  }
  return {grad_d, grad_margins};
}

}  // namespace cuda
}  // namespace crl
