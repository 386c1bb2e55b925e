// Exception types that the bindings translate into the matching Python exceptions.
// Every message names the call and the argument: "permute_pad: rows[3] = 7 is out of range ...".
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace hm {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
// Messages are built with std::string and to_string/snprintf, not iostreams: an ostringstream
// reaches the process-wide locale machinery of whichever libstdc++ the host loaded first, and on
// a machine whose Python and torch come from another toolchain that crashed the very first check
// (seen on a GPU machine: a segfault inside ostream::_M_insert<long> in a bounds check).
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append(std::string& s, char v) { s += v; }
template <typename T>
void append(std::string& s, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_enum_v<T>) {
    s += std::to_string(static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
    s += buf;
  } else {
    static_assert(std::is_convertible_v<const T&, std::string>, "hm::concat: unsupported message part type");
    s += std::string(v);
  }
}
}  // namespace detail

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string s;
  (detail::append(s, parts), ...);
  return s;
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
