// lightning_sparse::masked_zero_(weights, masks): zero every weight whose bool mask is False, in place.
//
// One pass over each layer: read the mask byte, clear the weight's bits where it is 0. That is one read and
// one write of the weights plus one byte per weight, which is what a multiply by a float mask costs without
// the float mask. torch's own `mul_` with a bool/uint8 mask first converts the whole mask to a float
// temporary on the CPU. The bit clear works for every element size and leaves +0.0 behind (also where the
// weight was NaN or inf); kept weights are untouched, bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int64_t kGrainSize = 1 << 16;

template <typename bits_t>
void zero_where_false(const at::Tensor& weight, const at::Tensor& mask) {
  auto* w = static_cast<bits_t*>(weight.mutable_data_ptr());
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  at::parallel_for(0, weight.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      w[i] &= static_cast<bits_t>(0) - static_cast<bits_t>(m[i]);  // all ones where the mask is 1
    }
  });
}

void masked_zero_(at::TensorList weights, at::TensorList masks) {
  TORCH_CHECK(weights.size() == masks.size(), "masked_zero_: got ", weights.size(), " weights and ",
              masks.size(), " masks");
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& weight = weights[k];
    const at::Tensor& mask = masks[k];
    TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_zero_: mask ", k, " must be torch.bool, got ",
                mask.scalar_type());
    TORCH_CHECK(weight.is_cpu() && mask.is_cpu(), "masked_zero_: weight and mask ", k, " must be on the CPU");
    TORCH_CHECK(weight.is_contiguous() && mask.is_contiguous(), "masked_zero_: weight and mask ", k,
                " must be contiguous");
    TORCH_CHECK(weight.numel() == mask.numel(), "masked_zero_: weight ", k, " has ", weight.numel(),
                " elements but its mask has ", mask.numel());
    switch (weight.element_size()) {
      case 1: zero_where_false<uint8_t>(weight, mask); break;
      case 2: zero_where_false<uint16_t>(weight, mask); break;
      case 4: zero_where_false<uint32_t>(weight, mask); break;
      case 8: zero_where_false<uint64_t>(weight, mask); break;
      default: TORCH_CHECK(false, "masked_zero_: unsupported element size ", weight.element_size());
    }
  }
}

}  // namespace

TORCH_LIBRARY(lightning_sparse, m) {
  m.def("masked_zero_(Tensor(a!)[] weights, Tensor[] masks) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("masked_zero_", &masked_zero_);
}
