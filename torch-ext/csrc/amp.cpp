// Mixed precision as torch does it, which tch binds only in part: autocast with a dtype per
// device type (tch's `autocast` switches CUDA's only, in fp16), and the kernel of torch's
// GradScaler.unscale_ (`_amp_foreach_non_finite_check_and_unscale_`, a tensor-list op tch
// leaves out; `_amp_update_scale_` tch has). Errors and tensors as common.h says.

#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "common.h"

using cnclip_ext::guarded;

extern "C" {

void cnclip_ext_free(void* p) {
  std::free(p);
}

// A message the shim owns (for cnclip_ext_free) with `len` bytes of `text`.
char* cnclip_ext_message(const char* text, size_t len) {
  return cnclip_ext::copy(std::string(text, len));
}

// Switches autocast on or off for `device` (c10::DeviceType: 0 CPU, 1 CUDA) with `dtype`
// (c10::ScalarType: 5 half, 15 bfloat16) on this thread, as entering torch.autocast(device,
// dtype) does; `previous` gets the state to give back on leaving.
char* cnclip_autocast_enter(int device, bool enabled, int dtype, bool* previous_enabled, int* previous_dtype) {
  return guarded([&] {
    auto type = static_cast<c10::DeviceType>(device);
    *previous_enabled = at::autocast::is_autocast_enabled(type);
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_enabled(type, enabled);
    at::autocast::set_autocast_dtype(type, static_cast<c10::ScalarType>(dtype));
    at::autocast::increment_nesting();
  });
}

// Leaves what cnclip_autocast_enter entered, giving back the state before it; the cast-weight
// cache is cleared when the outermost autocast ends, as torch.autocast's __exit__ does.
char* cnclip_autocast_exit(int device, bool previous_enabled, int previous_dtype) {
  return guarded([&] {
    auto type = static_cast<c10::DeviceType>(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, previous_enabled);
    at::autocast::set_autocast_dtype(type, static_cast<c10::ScalarType>(previous_dtype));
  });
}

// torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale): multiplies
// every gradient by `inv_scale` in place and sets `found_inf` to 1 if any holds an inf or NaN.
char* cnclip_amp_unscale(at::Tensor** grads, size_t n, at::Tensor* found_inf, at::Tensor* inv_scale) {
  return guarded([&] {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*grads[i]);
    }
    at::_amp_foreach_non_finite_check_and_unscale_(list, *found_inf, *inv_scale);
  });
}

} // extern "C"
