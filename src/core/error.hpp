// Two error tiers (see STYLE.md): caller errors throw dfm::Error with a message that names the
// input and what was expected; internal invariants use DFM_ASSERT, which aborts with file:line.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dfm {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Builds a message from streamable parts: fail("x has ", n, " rows, expected ", m).
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

}  // namespace dfm

#define DFM_CHECK(cond, ...)                 \
  do {                                       \
    if (!(cond)) ::dfm::fail(__VA_ARGS__);   \
  } while (0)

#define DFM_ASSERT(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "internal error: %s:%d: assertion '%s' failed\n", __FILE__,      \
                   __LINE__, #cond);                                                       \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)
