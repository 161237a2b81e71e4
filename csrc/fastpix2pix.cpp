// The fastpix2pix operator library: every op schema in one place, and the Python module stub that
// loads the library. Kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL), the device-generic
// conv + fused-epilogue compositions in blocks.cpp, autograd and fake kernels in fastpix2pix/ops.py.
//
// Conventions shared by all ops:
//   * `negative_slope` describes the activation: LeakyReLU with that slope, 0 is ReLU, 1 the identity.
//   * BatchNorm statistics (`mean`, `var`: biased batch variance) are per channel, in float32 for
//     float32/bfloat16/float16 inputs and float64 for float64 inputs.
//   * `groups` (BatchNorm ops, default 1) splits the batch into that many equal consecutive parts, each
//     normalised with its own statistics (as if each were a separate batch: pix2pix's discriminator sees its
//     fake and real pairs as one batch of two groups). Statistics and their sums then have groups * C values,
//     group-major (entry g * C + c is channel c of group g); the affine weight and bias stay per channel.
//   * Outputs documented as "None unless ..." are undefined tensors (None in Python) otherwise.
//   * Ops never mutate their inputs (so that torch.library.register_autograd applies); running
//     statistics are updated by the Python wrapper from the returned batch statistics.

#include <Python.h>
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(fastpix2pix, m) {
  // --- fused BatchNorm + activation pieces (per-device kernels) ---------------------------------
  // Per-channel batch mean and biased variance over (N, H, W).
  m.def("bn_stats(Tensor x, int groups=1) -> (Tensor mean, Tensor var)");
  // out = act((x - mean) * rsqrt(var + eps) * weight + bias); weight/bias None means 1/0.
  m.def(
      "bn_act_forward(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "float negative_slope, int groups=1) -> Tensor");
  // The backward's reduction: with dz = grad_out * act'(z), returns per channel
  // sum_dz = sum(dz) (the grad of bias) and sum_dz_xhat = sum(dz * xhat) (the grad of weight).
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, float negative_slope, int groups=1) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  // The backward's apply pass. Training: grad_x = weight * invstd * (dz - sum_dz / count
  // - xhat * sum_dz_xhat / count), where count is the number of values per channel that the
  // statistics were taken over (N*H*W / groups; larger when they were combined across processes).
  // Eval (training=False): grad_x = dz * weight * invstd, and the sums are not read.
  m.def(
      "bn_act_backward_apply(Tensor grad_out, Tensor x, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor sum_dz, Tensor sum_dz_xhat, int count, float eps, float negative_slope, "
      "bool training, int groups=1) -> Tensor");

  // --- bias + activation (the norm-free layers) ------------------------------------------------
  m.def("bias_act_forward(Tensor x, Tensor? bias, float negative_slope) -> Tensor");
  // act'(z) is read off the forward output's sign; grad_bias is None unless need_bias_grad, and in the
  // statistics dtype (float32 for float32/bfloat16/float16 outputs: a sum over N*H*W values is not
  // rounded to bfloat16; a conv bias stays float32 under autocast).
  m.def(
      "bias_act_backward(Tensor grad_out, Tensor out, float negative_slope, bool need_bias_grad) "
      "-> (Tensor grad_x, Tensor grad_bias)");

  // --- the U-Net skip connection (cpu/concat.cpp, cuda/concat.cu) -------------------------------
  // cat([relu(skip), x], dim=1): skip and x share N, H, W and dtype; the output is laid out as x is
  // (channels_last if x is, else NCHW). The backward splits grad_out into grad_skip = grad_out[:, :C_skip]
  // where skip > 0 (else 0) and grad_x = grad_out[:, C_skip:], both dense and laid out as grad_out.
  m.def("relu_cat(Tensor skip, Tensor x) -> Tensor");
  m.def("relu_cat_backward(Tensor grad_out, Tensor skip) -> (Tensor grad_skip, Tensor grad_x)");

  // --- losses: value and gradient in one pass --------------------------------------------------
  // mean GAN loss of logits against an all-real/all-fake target; mode "vanilla" (BCE with logits)
  // or "lsgan" (MSE). grad is d(loss)/d(logits) (None unless compute_grad).
  m.def(
      "gan_loss(Tensor logits, bool target_is_real, str mode, bool compute_grad) "
      "-> (Tensor loss, Tensor grad)");
  // The GAN losses of `logits` split along dim 0 into len(targets_are_real) equal consecutive groups, group g
  // against target targets_are_real[g]: losses[g] is group g's mean loss, and grad (None unless compute_grad)
  // holds on group g's elements the gradient of losses[g]. The discriminator's fake and real maps in one op.
  m.def(
      "gan_losses(Tensor logits, bool[] targets_are_real, str mode, bool compute_grad) "
      "-> (Tensor losses, Tensor grad)");
  // weight * mean|pred - target| and its gradient with respect to pred (None unless compute_grad).
  m.def(
      "l1_loss(Tensor pred, Tensor target, float weight, bool compute_grad) "
      "-> (Tensor loss, Tensor grad)");

  // --- optimizer: Adam on float32 master weights from low-precision gradients (cpu/adam.cpp) ---------
  // Per i: steps[i] += 1, then torch.optim.Adam's update (amsgrad off) of params[i] (float32) and its
  // moments from grads[i], and copies[i] = params[i] rounded to the copies' dtype (bfloat16, float16 or
  // float32, the grads' dtype). The moments and copy have the param's shape and strides. lr and the steps
  // are tensors on the params' device, read there (a CUDA graph replays the op with their current values).
  m.def(
      "adam_master_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] copies, Tensor(e!)[] steps, Tensor lr, float beta1, "
      "float beta2, float weight_decay, float eps) -> ()");

  // --- blocks: convolution (ATen: oneDNN / cuDNN) + the fused epilogue (blocks.cpp) -------------
  // Training: batch statistics (per group), returned as mean/var. Eval: running statistics normalise every
  // group alike and are returned (copied, C values). conv_out is the pre-normalisation convolution output,
  // kept for backward.
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
      "Tensor? running_var, int[2] stride, int[2] padding, int[2] output_padding, bool transposed, "
      "bool training, float eps, float negative_slope, int groups=1) "
      "-> (Tensor out, Tensor conv_out, Tensor mean, Tensor var)");
  // output_mask selects (grad_x, grad_weight, grad_bn_weight, grad_bn_bias); unselected are None. The affine
  // parameters' gradients are summed over the groups (one weight and bias normalise them all).
  m.def(
      "conv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor conv_out, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, int[2] stride, int[2] padding, "
      "int[2] output_padding, bool transposed, bool training, float eps, float negative_slope, "
      "bool[4] output_mask, int groups=1) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, bool transposed, float negative_slope) -> Tensor");
  // output_mask selects (grad_x, grad_weight, grad_bias); unselected are None.
  m.def(
      "conv_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, int[2] stride, "
      "int[2] padding, int[2] output_padding, bool transposed, float negative_slope, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

// `import fastpix2pix._C` loads this shared library, which registers the ops above. The module
// carries only the build record (see build_info.h).
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastpix2pix operator library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "BUILD_INFO", fastpix2pix::kBuildInfoJson) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
