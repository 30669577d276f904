// The shared operation test bodies (tests/bodies/ops_bodies.hpp), instantiated for the cuda
// device with every precision policy, and with double (the gradient-check type). The cpu
// instantiation is tests/test_ops.cpp; main() is in test_cuda.cu.
#include <trident/cuda.hpp>

#include "../bodies/ops_bodies.hpp"

namespace {
/// double on the cuda device: not a training precision, but the type gradient checks run in.
struct double_cuda {
  using storage_type = double;
  using device = trident::cuda;
};
}  // namespace

#define TRIDENT_CUDA_POLICIES                                                                                 \
  trident::policy<trident::fp32, trident::cuda>, trident::policy<trident::bf16_mixed, trident::cuda>, \
      trident::policy<trident::fp16_mixed, trident::cuda>, double_cuda

TEST_CASE_TEMPLATE_INVOKE(binary_ops_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(unary_ops_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(reduce_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(softmax_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(gemm_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(random_id, TRIDENT_CUDA_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(copy_id, TRIDENT_CUDA_POLICIES);
