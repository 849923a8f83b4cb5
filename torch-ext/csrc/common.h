// What every shim file shares. A function that can fail returns NULL, or an error message
// (malloc'd: the caller frees it with cnclip_ext_free) and leaves its outputs untouched.
// Tensors come as tch's pointers, which are `at::Tensor*` (torch-sys's
// `typedef torch::Tensor *tensor`).
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <c10/util/Exception.h>

namespace cnclip_ext {

inline char* copy(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out == nullptr) {
    // A null return reads as success: with no memory left for a message, stop here.
    std::abort();
  }
  std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

// Runs `body`; a C++ exception becomes the returned message.
template <typename F>
inline char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy(e.what());
  } catch (...) {
    return copy("an unknown C++ exception");
  }
}

} // namespace cnclip_ext
