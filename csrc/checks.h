// Input validation and layout helpers shared by the CPU and CUDA kernels of every op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fastpix2pix {

// The statistics dtype: float32 for float32/bfloat16/float16 inputs, float64 for float64.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

inline void check_4d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              ref.device());
}

// A per-channel vector (statistics, affine weight/bias): 1-D with C elements, on the input's device.
inline void check_channel_vector(const at::Tensor& ref, const at::Tensor& t, int64_t channels, const char* op,
                                 const char* name) {
  check_same_device(ref, t, op, name);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, op, ": ", name, " must have shape (", channels,
              "), got ", t.sizes());
  check_floating(t, op, name);
}

inline void check_optional_channel_vector(const at::Tensor& ref, const std::optional<at::Tensor>& t,
                                          int64_t channels, const char* op, const char* name) {
  if (t.has_value() && t->defined()) {
    check_channel_vector(ref, *t, channels, op, name);
  }
}

inline void check_same_dtype(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", ref.scalar_type());
}

inline void check_same_shape(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  check_same_device(ref, t, op, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have shape ", ref.sizes(), ", got ",
              t.sizes());
}

// A grouped BatchNorm's `groups` (schema: fastpix2pix.cpp): at least 1, and dividing the batch of x.
inline void check_groups(const at::Tensor& x, int64_t groups, const char* op) {
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(x.dim() >= 1 && x.size(0) % groups == 0, op, ": the batch of ", x.sizes(),
              " does not split into groups=", groups, " equal parts");
}

// The arguments every BatchNorm op shares: x a 4-D floating tensor whose batch splits into `groups`; the
// statistics vectors of groups * C values and the optional affine parameters of C values, on its device.
inline void check_bn_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const char* op, int64_t groups = 1) {
  check_4d(x, op, "x");
  check_floating(x, op, "x");
  check_groups(x, groups, op);
  const int64_t channels = x.size(1);
  check_channel_vector(x, mean, groups * channels, op, "mean");
  check_channel_vector(x, var, groups * channels, op, "var");
  check_optional_channel_vector(x, weight, channels, op, "weight");
  check_optional_channel_vector(x, bias, channels, op, "bias");
}

// A backward op's incoming gradient: the shape and dtype of the forward tensor it belongs to.
inline void check_grad_out(const at::Tensor& forward_tensor, const at::Tensor& grad_out, const char* op) {
  TORCH_CHECK(grad_out.defined(), op, ": grad_out is undefined");
  check_same_shape(forward_tensor, grad_out, op, "grad_out");
  check_same_dtype(forward_tensor, grad_out, op, "grad_out");
}

// BatchNorm needs more than one value per channel to estimate a variance (as nn.BatchNorm2d says). Like
// nn.BatchNorm2d, an empty batch passes: it has no statistics, but nothing to normalise either.
inline void check_values_per_channel(const at::Tensor& x, const char* op, int64_t groups = 1) {
  TORCH_CHECK(x.size(1) == 0 || x.numel() / (x.size(1) * groups) != 1, op,
              ": expected more than 1 value per channel when training, got input size ", x.sizes(),
              groups > 1 ? " split into " + std::to_string(groups) + " groups" : std::string());
}

// Group g of the batch of t split into `groups` equal consecutive parts: a view, laid out as t (the batch is
// the outermost dimension of NCHW and channels_last, so a group of either is itself NCHW or channels_last).
inline at::Tensor batch_group(const at::Tensor& t, int64_t groups, int64_t g) {
  const int64_t size = t.size(0) / groups;
  return t.narrow(0, g * size, size);
}

// Group g's `channels` values of a grouped statistics vector (group-major), or an undefined tensor.
inline at::Tensor stats_group(const at::Tensor& stats, int64_t channels, int64_t g) {
  return stats.defined() ? stats.narrow(0, g * channels, channels) : at::Tensor();
}

// The memory layouts the kernels walk directly: NCHW-contiguous and channels_last. Anything else
// (a strided view, a permutation) is copied into NCHW first.
enum class Layout { kNCHW, kChannelsLast };

inline Layout layout_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return Layout::kChannelsLast;
  }
  return Layout::kNCHW;
}

inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::kChannelsLast ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// `t` in `layout`, copying only when it is not already laid out that way.
inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  return t.contiguous(memory_format_of(layout));
}

// Strides equal wherever they matter (a size-1 dimension's stride never does).
inline bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// An op output whose fake kernel is `empty_like(x)` must have exactly those strides (torch.compile asserts
// them), and empty_like keeps a dense input's strides, whatever their order. The kernels write NCHW or
// channels_last, which is what empty_like gives in all but rare cases (dense permutations other than these
// two); for those the kernel writes an NCHW `buffer` and `finish` copies it into place.
struct OutputLike {
  at::Tensor out;
  Layout layout;
  at::Tensor buffer;

  explicit OutputLike(const at::Tensor& x) : out(at::empty_like(x)), layout(layout_of(out)) {
    buffer = out.is_contiguous(memory_format_of(layout)) ? out : at::empty(out.sizes(), out.options());
  }

  at::Tensor finish() const { return buffer.is_same(out) ? out : out.copy_(buffer); }
};

// The layout a reduction over x walks: the one its elementwise siblings walk (see OutputLike), so that
// forward and backward copy the same inputs, and none when x is NCHW or channels_last.
inline Layout walk_layout(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? layout_of(x) : OutputLike(x).layout;
}

// `t` with the memory order of `ref`, a dense tensor of the same shape, so that the two can be walked
// flat, element i of one matching element i of the other: `t` itself when it already has it, else a copy.
inline at::Tensor in_memory_order_of(const at::Tensor& t, const at::Tensor& ref) {
  return same_memory_order(t, ref) && t.is_non_overlapping_and_dense() ? t : at::empty_like(ref).copy_(t);
}

// The per-channel optional parameter as a contiguous statistics-dtype vector, or an undefined tensor.
inline at::Tensor channel_param(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) {
    return at::Tensor();
  }
  return t->to(dtype).contiguous();
}

// The arguments of adam_master_step_ (schema: fastpix2pix.cpp), shared by its CPU and CUDA kernels: the lists
// of one length; per entry a dense float32 weight, float32 moments and a copy with its shape and strides, a
// gradient of the copy's dtype (bfloat16, float16 or float32) and shape, and a one-element float32 step count;
// lr a one-element float32 tensor. All on `device`.
inline void check_adam_master_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps,
                                   const at::Tensor& lr, const c10::Device& device) {
  constexpr const char* op = "fastpix2pix::adam_master_step_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && copies.size() == n &&
                  steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, copies and steps must have one length");
  TORCH_CHECK(lr.defined() && lr.numel() == 1 && lr.scalar_type() == at::kFloat && lr.device() == device, op,
              ": lr must be a one-element float32 tensor on ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device() == device, op, ": params[", i, "] is on ", param.device(), ", not ", device);
    TORCH_CHECK(param.scalar_type() == at::kFloat, op, ": params[", i, "] must be float32, got ",
                param.scalar_type());
    TORCH_CHECK(param.is_non_overlapping_and_dense(), op, ": params[", i, "] must be dense");
    const auto dtype = copies[i].scalar_type();
    TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, op, ": copies[", i,
                "] must be bfloat16, float16 or float32, got ", dtype);
    TORCH_CHECK(grads[i].scalar_type() == dtype, op, ": grads[", i, "] (", grads[i].scalar_type(),
                ") and copies[", i, "] (", dtype, ") must have one dtype");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat, op,
                ": the moments of params[", i, "] must be float32");
    for (const at::Tensor* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i], &copies[i]}) {
      check_same_shape(param, *t, op, "a gradient, moment or copy");
    }
    for (const at::Tensor* t : {&exp_avgs[i], &exp_avg_sqs[i], &copies[i]}) {
      TORCH_CHECK(t->strides() == param.strides(), op, ": the moments and copy of params[", i,
                  "] must have its strides");
    }
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat && steps[i].device() == device,
                op, ": steps[", i, "] must be a one-element float32 tensor on ", device);
  }
}

// A gradient laid out as its weight (a conv backward may return another layout than the weight's).
inline at::Tensor in_layout_of(const at::Tensor& grad, const at::Tensor& param) {
  return grad.strides() == param.strides() ? grad : at::empty_like(param, grad.options()).copy_(grad);
}

// Two 4-D floating tensors of one dtype and device (`ref` the one the op follows); whether they share N, H, W.
inline bool same_batch_and_size(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                const char* name, const char* op) {
  check_4d(t, op, name);
  check_4d(ref, op, ref_name);
  check_floating(ref, op, ref_name);
  check_same_device(ref, t, op, name);
  check_same_dtype(ref, t, op, name);
  return t.size(0) == ref.size(0) && t.size(2) == ref.size(2) && t.size(3) == ref.size(3);
}

// relu_cat's inputs: skip and x of one dtype and device, with the same N, H and W.
inline void check_relu_cat_args(const at::Tensor& skip, const at::Tensor& x, const char* op) {
  TORCH_CHECK(same_batch_and_size(x, "x", skip, "skip", op), op, ": skip ", skip.sizes(), " and x ", x.sizes(),
              " must have the same batch size, height and width");
}

// relu_cat_backward's inputs: grad_out covers skip's channels and at least as many more.
inline void check_relu_cat_backward_args(const at::Tensor& grad_out, const at::Tensor& skip, const char* op) {
  TORCH_CHECK(same_batch_and_size(grad_out, "grad_out", skip, "skip", op) && skip.size(1) <= grad_out.size(1),
              op, ": grad_out ", grad_out.sizes(), " does not hold skip ", skip.sizes(), " in its first channels");
}

// Whether each of the groups along dim 0 of t (a dense tensor) is one block of memory: true when the batch is
// the outermost dimension in memory (NCHW, channels_last, any contiguous tensor) or there is at most one item.
inline bool batch_outermost(const at::Tensor& t) {
  return t.dim() == 0 || t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel();
}

// gan_losses' targets: at least one group, and as many groups dividing the batch of the logits.
inline void check_loss_groups(const at::Tensor& logits, int64_t groups, const char* op) {
  TORCH_CHECK(groups >= 1, op, ": targets_are_real must name the target of at least one group");
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have a batch dimension to split into groups, got a 0-dim tensor");
  check_groups(logits, groups, op);
}

// The [N, C, H, W] output of an op laid out in `layout`.
inline at::Tensor empty_in_layout(at::IntArrayRef sizes, const at::TensorOptions& options, Layout layout) {
  return at::empty(sizes, options.memory_format(memory_format_of(layout)));
}

}  // namespace fastpix2pix
