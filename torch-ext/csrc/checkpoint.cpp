// Activation checkpointing as torch.utils.checkpoint's reentrant variant (what cn_clip's
// `set_grad_checkpointing` uses): a function of one tensor runs without recording a graph; its
// output gets an autograd node that, in backward, runs the function again with the random
// number generator's state of the first run (so dropout draws the same masks), now recording,
// and backpropagates through that: parameters receive their gradients from the inner
// backward, the input its gradient from the node. Only the input is kept between the passes,
// not the function's activations. The function is a Rust closure behind a C callback.

#include <memory>
#include <mutex>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "common.h"

using cnclip_ext::guarded;

extern "C" {
// Runs the closure on `input`, writing its result into `output` (with cnclip_tensor_assign);
// NULL on success, else a malloc'd message.
typedef char* (*cnclip_run_fn)(void* closure, const at::Tensor* input, at::Tensor* output);
// Frees the closure.
typedef void (*cnclip_drop_fn)(void* closure);
}

namespace {

// The closure, freed once by whichever holder goes last (the forward call or the node).
struct Closure {
  void* data;
  cnclip_run_fn run;
  cnclip_drop_fn drop;
  ~Closure() { drop(data); }

  at::Tensor call(const at::Tensor& input) const {
    at::Tensor output;
    char* error = run(data, &input, &output);
    if (error != nullptr) {
      std::string message(error);
      std::free(error);
      throw std::runtime_error(message);
    }
    return output;
  }
};

// The states of the generators the function may draw from: the CPU's, and the input's GPU's
// (torch's checkpoint saves the same two).
struct RngStates {
  at::Tensor cpu;
  at::Tensor device;
  c10::Device where = c10::Device(c10::kCPU);
};

at::Tensor generator_state(const c10::Device& device) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_generator_state(const c10::Device& device, const at::Tensor& state) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

RngStates rng_states(const c10::Device& where) {
  RngStates states;
  states.cpu = generator_state(c10::Device(c10::kCPU));
  if (where.is_cuda()) {
    states.where = where;
    states.device = generator_state(where);
  }
  return states;
}

void set_rng_states(const RngStates& states) {
  set_generator_state(c10::Device(c10::kCPU), states.cpu);
  if (states.device.defined()) {
    set_generator_state(states.where, states.device);
  }
}

// This thread's autocast settings for the CPU and CUDA: the recomputation runs under the
// forward's (backward may run on another thread, as it does for CUDA).
struct Autocast {
  bool cpu = false;
  bool cuda = false;
  c10::ScalarType cpu_dtype = c10::kBFloat16;
  c10::ScalarType cuda_dtype = c10::kHalf;

  static Autocast current() {
    Autocast a;
    a.cpu = at::autocast::is_autocast_enabled(c10::DeviceType::CPU);
    a.cuda = at::autocast::is_autocast_enabled(c10::DeviceType::CUDA);
    a.cpu_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CPU);
    a.cuda_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CUDA);
    return a;
  }

  void apply() const {
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, cpu);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, cuda);
    at::autocast::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
  }
};

struct CheckpointBackward : public torch::autograd::Node {
  Autocast autocast;
  std::shared_ptr<Closure> closure;
  at::Tensor input;
  RngStates rng;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!grads[0].defined()) {
      return {at::Tensor()};
    }
    at::Tensor x = input.detach();
    x.set_requires_grad(true);
    RngStates now = rng_states(rng.where);
    Autocast before = Autocast::current();
    set_rng_states(rng);
    autocast.apply();
    at::autocast::increment_nesting();
    auto restore = [&] {
      if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
      }
      before.apply();
      set_rng_states(now);
    };
    at::Tensor y;
    try {
      at::AutoGradMode enable(true);
      // The function gets a view of the leaf, not the leaf: autocast caches its casts of
      // leaves that require grad (meant for weights), and one cached cast for several uses
      // would sum their gradients in the low precision, where the run without checkpointing
      // casts per use and sums in fp32.
      y = closure->call(x.view_as(x));
    } catch (...) {
      restore();
      throw;
    }
    restore();
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad()};
  }

  std::string name() const override { return "CnclipCheckpointBackward"; }

  void release_variables() override {
    input.reset();
    rng = RngStates();
  }
};

} // namespace

extern "C" {

// *dst = *src: the Rust side hands its result tensor over.
void cnclip_tensor_assign(at::Tensor* dst, const at::Tensor* src) {
  *dst = *src;
}

// A new handle on `t`, for the Rust side to own (tch frees it).
at::Tensor* cnclip_tensor_handle(const at::Tensor* t) {
  return new at::Tensor(*t);
}

// output = closure(input), checkpointed. With gradients off, or an input that needs none (a
// frozen tower's: the recomputation is reached only through the input's node), it simply runs.
// The closure is freed when no longer needed.
char* cnclip_checkpoint(void* data, cnclip_run_fn run, cnclip_drop_fn drop, at::Tensor* input, at::Tensor** out) {
  auto closure = std::make_shared<Closure>();
  closure->data = data;
  closure->run = run;
  closure->drop = drop;
  return guarded([&] {
    if (!at::GradMode::is_enabled() || !input->requires_grad()) {
      *out = new at::Tensor(closure->call(*input));
      return;
    }
    RngStates rng = rng_states(input->device());
    at::Tensor y;
    {
      at::NoGradGuard no_grad;
      y = closure->call(*input);
    }
    auto node = std::shared_ptr<CheckpointBackward>(new CheckpointBackward(), torch::autograd::deleteNode);
    node->closure = closure;
    node->input = input->detach();
    node->rng = rng;
    node->autocast = Autocast::current();
    node->set_next_edges(torch::autograd::collect_next_edges(*input));
    torch::autograd::set_history(y, node);
    *out = new at::Tensor(y);
  });
}

} // extern "C"
