// Shared helpers of the test suite.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace dfm::test {

inline std::string source_path(const std::string& rel) { return std::string(DIFFORMER_SOURCE_DIR) + "/" + rel; }

// A parameter's array name in the fixture archives: "convs.0.Wq.weight" -> "convs__0__Wq__weight".
inline std::string fixture_name(const std::string& param) {
  std::string out;
  for (char c : param) out += c == '.' ? std::string("__") : std::string(1, c);
  return out;
}

// Runs fn, expects a dfm::Error whose message contains every one of `parts`.
inline void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no dfm::Error thrown; expected one containing '" << parts.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nlacks: " << p;
  }
}

// ||a - b|| / ||b|| in double; 0 when both are zero.
template <typename A, typename B>
double rel_err(const A& a, const B& b) {
  const MatD ad = a.template cast<double>(), bd = b.template cast<double>();
  const double den = bd.norm(), num = (ad - bd).norm();
  if (den == 0) return num;
  return num / den;
}

inline Csr dense_to_csr(const Mat& x) {
  Csr c;
  c.rows = x.rows();
  c.cols = x.cols();
  c.indptr.push_back(0);
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j)
      if (x(i, j) != 0.0f) {
        c.indices.push_back(static_cast<std::int32_t>(j));
        c.values.push_back(x(i, j));
      }
    c.indptr.push_back(static_cast<Index>(c.indices.size()));
  }
  return c;
}

inline CsrD to_double(const Csr& c) {
  CsrD d;
  d.rows = c.rows;
  d.cols = c.cols;
  d.indptr = c.indptr;
  d.indices = c.indices;
  d.values.assign(c.values.begin(), c.values.end());
  return d;
}

}  // namespace dfm::test
