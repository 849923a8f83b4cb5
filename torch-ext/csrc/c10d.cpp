// What cnclip needs of libtorch's c10d that tch does not bind: a TCPStore for the rendezvous,
// Gloo process groups and their collectives. A thin C ABI over libtorch's own classes (as
// torch-sys's torch_api.cpp is over ATen): no collective here is ours. Errors and tensors as
// common.h says.

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

using cnclip_ext::guarded;

namespace {

std::chrono::milliseconds millis(int64_t ms) {
  return std::chrono::milliseconds(ms);
}

} // namespace

struct CnGroup;

namespace {

// The sum over the ranks of `tensor` (a new tensor on its device; GPU tensors go through host
// memory, as Gloo reduces CPU tensors), issued under the group's lock and waited for.
at::Tensor sum_over_ranks(CnGroup* group, const at::Tensor& tensor);

// The backward of all_reduce_sum_autograd: every rank's output is the same sum, so the input's
// gradient on each rank is the sum over the ranks of their outputs' gradients
// (torch.distributed.nn.functional.all_reduce's backward).
struct AllReduceSumBackward : public torch::autograd::Node {
  CnGroup* group = nullptr;
  std::vector<int64_t> shape;
  c10::TensorOptions options;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // A rank whose loss did not use the sum still takes part, with zeros.
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros(shape, options);
    return {sum_over_ranks(group, grad)};
  }

  std::string name() const override { return "CnclipAllReduceSumBackward"; }
};

} // namespace

struct CnStore {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct CnGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // Held while a collective is issued: Gloo numbers each with a tag counter
  // (ProcessGroupGloo::nextTag) that two threads issuing at once would race on; autograd's
  // backward issues too (all_reduce_sum_autograd), from whichever thread runs it.
  std::mutex issuing;
};

struct CnWork {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds timeout;
};

extern "C" {

// A TCPStore: the server (rank 0's, listening on `port`, 0 for any free port) or a client of
// it. The server does not wait for the others here: the process group's rendezvous does.
char* cnclip_c10d_tcp_store(
    const char* host,
    uint16_t port,
    uint32_t world_size,
    bool is_server,
    int64_t timeout_ms,
    CnStore** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server;
    options.numWorkers = world_size;
    options.waitWorkers = false;
    options.timeout = millis(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    *out = new CnStore{std::move(store)};
  });
}

uint16_t cnclip_c10d_store_port(const CnStore* store) {
  return store->store->getPort();
}

char* cnclip_c10d_store_set(CnStore* store, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] {
    store->store->set(std::string(key), std::vector<uint8_t>(data, data + len));
  });
}

// The value of `key`, waiting for it up to the store's timeout; `*data` is malloc'd.
char* cnclip_c10d_store_get(CnStore* store, const char* key, uint8_t** data, size_t* len) {
  return guarded([&] {
    auto value = store->store->get(std::string(key));
    auto* buffer = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
    if (buffer == nullptr) {
      throw std::bad_alloc();
    }
    std::memcpy(buffer, value.data(), value.size());
    *data = buffer;
    *len = value.size();
  });
}

char* cnclip_c10d_store_add(CnStore* store, const char* key, int64_t value, int64_t* out) {
  return guarded([&] { *out = store->store->add(std::string(key), value); });
}

void cnclip_c10d_store_drop(CnStore* store) {
  delete store;
}

// A Gloo process group of `size` ranks over `store` (its keys under `prefix/` when given, as
// torch's init_process_group prefixes them), this process being `rank`. Its device
// binds `hostname` when given (an address of this machine), else as torch does
// (GLOO_SOCKET_IFNAME, or this host's name). Returns once every rank has joined, or fails after
// `timeout_ms`, which also bounds every collective.
char* cnclip_c10d_gloo(
    CnStore* store,
    int rank,
    int size,
    int64_t timeout_ms,
    const char* hostname,
    const char* prefix,
    CnGroup** out) {
  return guarded([&] {
    using c10d::ProcessGroupGloo;
    auto timeout = millis(timeout_ms);
    c10::intrusive_ptr<ProcessGroupGloo::Options> options;
    if (hostname != nullptr) {
      options = ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    } else {
      options = ProcessGroupGloo::Options::create_default(timeout);
    }
    c10::intrusive_ptr<c10d::Store> base = store->store;
    if (prefix != nullptr) {
      base = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base);
    }
    auto group = c10::make_intrusive<ProcessGroupGloo>(base, rank, size, options);
    *out = new CnGroup{std::move(group), timeout, {}};
  });
}

int cnclip_c10d_group_rank(const CnGroup* group) {
  return group->backend->getRank();
}

int cnclip_c10d_group_size(const CnGroup* group) {
  return group->backend->getSize();
}

void cnclip_c10d_group_drop(CnGroup* group) {
  delete group;
}

// Starts an all-reduce of `tensors` in place (one tensor: allreduce; several, of one dtype:
// allreduce_coalesced). `op` is c10d::ReduceOp::RedOpType (0 sum, 3 min, 4 max).
char* cnclip_c10d_all_reduce(CnGroup* group, at::Tensor** tensors, size_t n, int op, CnWork** out) {
  return guarded([&] {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*tensors[i]);
    }
    c10::intrusive_ptr<c10d::Work> work;
    auto reduce = c10d::ReduceOp(static_cast<c10d::ReduceOp::RedOpType>(op));
    if (n == 1) {
      c10d::AllreduceOptions options;
      options.reduceOp = reduce;
      options.timeout = group->timeout;
      std::lock_guard<std::mutex> lock(group->issuing);
      work = group->backend->allreduce(list, options);
    } else {
      c10d::AllreduceCoalescedOptions options;
      options.reduceOp = reduce;
      options.timeout = group->timeout;
      std::lock_guard<std::mutex> lock(group->issuing);
      work = group->backend->allreduce_coalesced(list, options);
    }
    *out = new CnWork{std::move(work), group->timeout};
  });
}

// *out = the sum over the ranks of `input`, differentiable: its gradient is the sum over the
// ranks of the result's gradients (issued in backward, which every rank runs in the same order).
// The group must outlive the graph.
char* cnclip_c10d_all_reduce_sum_autograd(CnGroup* group, at::Tensor* input, at::Tensor** out) {
  return guarded([&] {
    at::Tensor sum;
    {
      at::NoGradGuard no_grad;
      sum = sum_over_ranks(group, *input);
    }
    if (at::GradMode::is_enabled() && input->requires_grad()) {
      auto node = std::shared_ptr<AllReduceSumBackward>(new AllReduceSumBackward(), torch::autograd::deleteNode);
      node->group = group;
      node->shape = input->sizes().vec();
      node->options = input->options();
      node->set_next_edges(torch::autograd::collect_next_edges(*input));
      torch::autograd::set_history(sum, node);
    }
    *out = new at::Tensor(sum);
  });
}

// Starts gathering `input` from every rank into `outputs` (`size` tensors of its shape).
char* cnclip_c10d_all_gather(CnGroup* group, at::Tensor** outputs, size_t n, at::Tensor* input, CnWork** out) {
  return guarded([&] {
    std::vector<std::vector<at::Tensor>> gathered(1);
    for (size_t i = 0; i < n; ++i) {
      gathered[0].push_back(*outputs[i]);
    }
    std::vector<at::Tensor> inputs{*input};
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    std::lock_guard<std::mutex> lock(group->issuing);
    auto work = group->backend->allgather(gathered, inputs, options);
    *out = new CnWork{std::move(work), group->timeout};
  });
}

// Starts copying `tensor` from rank `root` to every rank, in place.
char* cnclip_c10d_broadcast(CnGroup* group, at::Tensor* tensor, int root, CnWork** out) {
  return guarded([&] {
    std::vector<at::Tensor> list{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = group->timeout;
    std::lock_guard<std::mutex> lock(group->issuing);
    auto work = group->backend->broadcast(list, options);
    *out = new CnWork{std::move(work), group->timeout};
  });
}

// Waits until every rank has reached it. Rank 0 waits for each other rank in turn and names the
// ranks that did not answer within the timeout (c10d's monitoredBarrier, as torch's
// `monitored_barrier(wait_all_ranks=True)`); the other ranks fail if rank 0 does not answer.
char* cnclip_c10d_barrier(CnGroup* group) {
  return guarded([&] {
    c10d::BarrierOptions options;
    options.timeout = group->timeout;
    std::lock_guard<std::mutex> lock(group->issuing);
    group->backend->monitoredBarrier(options, /*waitAllRanks=*/true);
  });
}

// Waits for `work` (its group's timeout at most). The work stays to be dropped.
char* cnclip_c10d_work_wait(CnWork* work) {
  return guarded([&] { work->work->wait(work->timeout); });
}

void cnclip_c10d_work_drop(CnWork* work) {
  delete work;
}

} // extern "C"

namespace {

at::Tensor sum_over_ranks(CnGroup* group, const at::Tensor& tensor) {
  at::Tensor host = tensor.detach().to(at::kCPU).contiguous().clone();
  std::vector<at::Tensor> list{host};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  options.timeout = group->timeout;
  c10::intrusive_ptr<c10d::Work> work;
  {
    std::lock_guard<std::mutex> lock(group->issuing);
    work = group->backend->allreduce(list, options);
  }
  work->wait(group->timeout);
  return host.to(tensor.device());
}

} // namespace
