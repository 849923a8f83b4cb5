// Declarations standing in for Gloo's headers, which the torch wheel lacks: see README.md.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {

// Named by ProcessGroupGloo::setTimeout's inline body only (never emitted here: the shim does
// not call it, and the class's vtable lives in libtorch_cpu).
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport

namespace rendezvous {

// The interface c10d's inline GlooStore overrides (without the v2 store API).
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
};

} // namespace rendezvous
} // namespace gloo
