// Exception types that the bindings translate into the matching Python exceptions.
// Every message names the call and the argument: "permute_pad: rows[3] = 7 is out of range ...".
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace hm {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <typename... Parts>
[[noreturn]] void value_error(const Parts&... parts) {
  throw ValueError(concat(parts...));
}

template <typename... Parts>
[[noreturn]] void type_error(const Parts&... parts) {
  throw TypeError(concat(parts...));
}

}  // namespace hm
