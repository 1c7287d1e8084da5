// The CUDA stages of profiling and mining at the level of tensors (cuda/stages.h): outputs and
// scratch allocated uninitialised (the kernels write every entry), views of the inputs read in
// place, and the launchers of cuda/mining.h on the current stream. Nothing here reads a value
// from the device.
#include <ATen/ATen.h>

#include "common/op_checks.h"
#include "cuda/mining.h"
#include "cuda/dtype_of.h"
#include "cuda/stages.h"
#include "cuda/tensor_glue.h"

namespace crl {
namespace cuda {
namespace {

// features [B, A, D], or logits [B, A, Cmax]; binary logits [B, A] as [B, A, 1] with a zero stride.
Values view_of(const Tensor& t) {
  Values v{t.data_ptr(), dtype_of(t.scalar_type()), {t.size(0), t.size(1), 1}, {t.stride(0), t.stride(1), 0}};
  if (t.dim() == 3) {
    v.size[2] = t.size(2);
    v.stride[2] = t.stride(2);
  }
  return v;
}

// Outputs anchors [R, A] and partners [R, A, 2K], and the kernels' view of the rows to mine.
std::tuple<Tensor, Tensor, MiningRows> mining_rows(const Tensor& labels, const Tensor& num_classes,
                                                  const Tensor& active, int64_t k, int64_t first, int64_t rows) {
  const int64_t attributes = labels.size(1);
  Tensor anchors = at::empty({rows, attributes}, labels.options().dtype(at::kBool));
  Tensor partners = at::empty({rows, attributes, 2 * k}, labels.options());
  const MiningRows m{labels.data_ptr<int64_t>(), num_classes.data_ptr<int64_t>(), active.data_ptr<bool>(),
                     labels.size(0), attributes, active.size(1), k, first, rows, anchors.data_ptr<bool>(),
                     partners.data_ptr<int64_t>()};
  return {anchors, partners, m};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes, int64_t max_classes,
                                           double threshold, bool validate) {
  const int64_t attributes = labels.size(1);
  Tensor counts = at::empty({attributes, max_classes}, labels.options());
  Tensor minority = at::empty({attributes, max_classes}, labels.options().dtype(at::kBool));
  Tensor active = at::empty_like(minority);
  launch_profile(labels.data_ptr<int64_t>(), num_classes.data_ptr<int64_t>(), labels.size(0), attributes,
                 max_classes, threshold, validate, counts.data_ptr<int64_t>(), minority.data_ptr<bool>(),
                 active.data_ptr<bool>(), current_stream());
  return {counts, minority, active};
}

std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                      const Tensor& active, int64_t k, int64_t first, int64_t rows) {
  auto [anchors, partners, m] = mining_rows(labels, num_classes, active, k, first, rows);
  const Values z = view_of(logits);
  const bool binary = logits.dim() == 2;
  const Tensor scratch = workspace(labels, mine_class_workspace(m, z, binary));
  launch_mine_class(z, binary, m, scratch.data_ptr(), current_stream());
  return {anchors, partners};
}

std::tuple<Tensor, Tensor> class_lists(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                       const Tensor& active, int64_t k) {
  const int64_t attributes = labels.size(1), max_classes = logits.dim() == 3 ? logits.size(2) : 2;
  Tensor keys = at::empty({attributes, max_classes, 2 * k},
                          logits.options().dtype(accumulation_type(logits.scalar_type())));
  Tensor indices = at::empty({attributes, max_classes, 2 * k}, labels.options());
  const MiningRows m{labels.data_ptr<int64_t>(), num_classes.data_ptr<int64_t>(),
                     active.defined() ? active.data_ptr<bool>() : nullptr, labels.size(0), attributes, max_classes, k,
                     0, 0, nullptr, nullptr};
  const Values z = view_of(logits);
  const bool binary = logits.dim() == 2;
  const Tensor scratch = workspace(labels, mine_class_workspace(m, z, binary));
  launch_class_lists(z, binary, m, keys.data_ptr(), indices.data_ptr<int64_t>(), scratch.data_ptr(), current_stream());
  return {keys, indices};
}

std::tuple<Tensor, Tensor> partner_rows(const Tensor& lists, const Tensor& labels, const Tensor& num_classes,
                                        const Tensor& active, int64_t first, int64_t rows) {
  auto [anchors, partners, m] = mining_rows(labels, num_classes, active, lists.size(2) / 2, first, rows);
  launch_partner_rows(lists.data_ptr<int64_t>(), m, current_stream());
  return {anchors, partners};
}

std::tuple<Tensor, Tensor, Tensor> mine_instance(const Tensor& features, const Tensor& logits, const Tensor& labels,
                                                 const Tensor& num_classes, const Tensor& active, int64_t k,
                                                 int64_t first, int64_t rows) {
  // Candidate codes are label * 2 + misclassified in int32.
  TORCH_CHECK_VALUE(active.size(1) <= (int64_t(1) << 30), "crl_ops: instance mining on CUDA takes at most 2^30 "
                    "classes per attribute, got ", active.size(1));
  auto [anchors, partners, m] = mining_rows(labels, num_classes, active, k, first, rows);
  Tensor overflow = at::empty({}, labels.options().dtype(at::kBool));
  const Tensor scratch = workspace(labels, mine_instance_workspace(m));
  launch_mine_instance(view_of(features), view_of(logits), logits.dim() == 2, m, overflow.data_ptr<bool>(),
                       scratch.data_ptr(), current_stream());
  return {anchors, partners, overflow};
}

}  // namespace cuda
}  // namespace crl
