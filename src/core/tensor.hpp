// Dense and sparse containers of the CPU engine. Dense tensors are row-major Eigen matrices
// ([N, F] with F contiguous), so a [N, H, D] tensor is an [N, H*D] matrix whose head h is the
// column block h*D .. h*D+D-1 (the same layout as PyTorch's reshape). Float32 is the engine
// type; the double versions exist for the naive reference kernels and the golden tests.
#pragma once
#include <Eigen/Dense>
#include <cstdint>
#include <vector>

namespace dfm {

using Index = std::int64_t;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXf;
using VecD = Eigen::VectorXd;
using MatMap = Eigen::Map<Mat>;
using ConstMatMap = Eigen::Map<const Mat>;
using VecMap = Eigen::Map<Vec>;
using ConstVecMap = Eigen::Map<const Vec>;
// A float array at Eigen's largest packet alignment. Vectorised Eigen kernels choose where their
// packets start by the address of the data, so on a buffer placed wherever the heap puts it the
// order of a sum (and with it the last bit of a result, and after many epochs the whole trajectory)
// would depend on the heap's layout, e.g. on the length of a file name given on the command line.
using FloatBuffer = std::vector<float, Eigen::aligned_allocator<float>>;

// Compressed sparse rows. For a graph operator, row i lists the edges whose TARGET is i and
// indices[] holds their sources, so y = A x is a row-parallel gather with no atomics.
template <typename T>
struct CsrT {
  Index rows = 0, cols = 0;
  std::vector<Index> indptr;     // rows + 1
  std::vector<std::int32_t> indices;  // nnz, column ids
  std::vector<T> values;         // nnz
  Index nnz() const { return static_cast<Index>(indices.size()); }
};
using Csr = CsrT<float>;
using CsrD = CsrT<double>;

// The transpose, built by a counting sort (stable: within a row, columns stay ascending when
// they were ascending in the input rows).
template <typename T>
CsrT<T> csr_transpose(const CsrT<T>& a) {
  CsrT<T> t;
  t.rows = a.cols;
  t.cols = a.rows;
  t.indptr.assign(static_cast<size_t>(t.rows) + 1, 0);
  for (auto c : a.indices) ++t.indptr[static_cast<size_t>(c) + 1];
  for (Index r = 0; r < t.rows; ++r) t.indptr[r + 1] += t.indptr[r];
  t.indices.resize(a.indices.size());
  t.values.resize(a.values.size());
  std::vector<Index> next(t.indptr.begin(), t.indptr.end() - 1);
  for (Index r = 0; r < a.rows; ++r)
    for (Index e = a.indptr[r]; e < a.indptr[r + 1]; ++e) {
      Index dst = next[a.indices[e]]++;
      t.indices[dst] = static_cast<std::int32_t>(r);
      t.values[dst] = a.values[e];
    }
  return t;
}

}  // namespace dfm
