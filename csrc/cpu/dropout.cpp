// CPU dropout: applies the counter-based mask of kernel_math.h to a row block.
#include "../kernel_math.h"
#include "../kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

namespace moslora {

template <>
void dropout_rows<c10::kCPU>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                             int64_t first_row) {
  const auto x_contig = x.contiguous();
  const int64_t rows = x_contig.size(0), cols = x_contig.size(1);
  const int64_t col_groups = (cols + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x_contig.const_data_ptr<scalar_t>();
    scalar_t* res = out.mutable_data_ptr<scalar_t>();
    const acc_t keep_scale = static_cast<acc_t>(spec.keep_scale);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* in_row = in + row * cols;
        scalar_t* out_row = res + row * cols;
        for (int64_t g = 0; g < col_groups; ++g) {
          const Philox4 words = philox4x32_10(spec.seed, first_row + row, static_cast<uint32_t>(g));
          for (int64_t t = 0; t < 4 && 4 * g + t < cols; ++t) {
            const int64_t col = 4 * g + t;
            out_row[col] = dropout_keep(words.w[t], spec.drop_threshold)
                               ? static_cast<scalar_t>(static_cast<acc_t>(in_row[col]) * keep_scale)
                               : scalar_t(0);
          }
        }
      }
    });
  });
}

}  // namespace moslora
