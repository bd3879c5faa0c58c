// NumPy .npy / .npz file I/O (the format numpy.save, numpy.savez and numpy.savez_compressed
// write). Only little-endian, C-order arrays of a few plain dtypes are supported; anything
// else is refused with a dfm::Error that names the file, the member and what was expected.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

// f32 '<f4', f64 '<f8', i32 '<i4', i64 '<i8', u8 '|u1', b1 '|b1' (numpy bool, one byte 0/1),
// unicode '<U<n>' (fixed-width UTF-32 strings, n code points each; kept as raw bytes).
enum class DType { f32, f64, i32, i64, u8, b1, unicode };

struct NpyArray {
  DType dtype = DType::f32;
  std::vector<Index> shape;         // empty = 0-d scalar
  std::vector<std::uint8_t> bytes;  // raw little-endian C-order data
  // Unicode only: characters per element (the n of '<Un'); the item size is 4 * char_width.
  Index char_width = 0;

  Index numel() const;     // product of shape (1 for 0-d)
  Index dim(int i) const;  // shape[i]; dfm::Error when i is out of range
  std::size_t itemsize() const;
  std::string descr() const;  // numpy dtype string, e.g. "<f4" or "<U923"

  // Converting accessors; `what` names the array in error messages (e.g. "cora.npz:x").
  std::vector<float> to_f32(const std::string& what) const;          // from f32/f64/i32/i64/u8/b1
  std::vector<double> to_f64(const std::string& what) const;         // same sources
  std::vector<std::int64_t> to_i64(const std::string& what) const;   // from i64/i32/u8/b1 only
  Mat to_mat(const std::string& what) const;    // 2-D [r, c], or 1-D [n] -> [n, 1]
  MatD to_matd(const std::string& what) const;  // same, double
  std::string to_string(const std::string& what) const;  // 0-d unicode array -> UTF-8

  static NpyArray from_f32(std::vector<Index> shape, const float* data);
  static NpyArray from_f64(std::vector<Index> shape, const double* data);
  static NpyArray from_i64(std::vector<Index> shape, const std::int64_t* data);
  static NpyArray from_string(const std::string& utf8);  // 0-d '<U<n>' array
};

// An archive; members keyed without the ".npy" suffix.
struct Npz {
  std::string path;
  std::map<std::string, NpyArray> arrays;
  bool has(const std::string& name) const;
  const NpyArray& at(const std::string& name) const;  // error: "<path>: no array 'name' (has: ...)"
};

// Reads both stored (savez) and deflated (savez_compressed) members.
Npz read_npz(const std::string& path);
NpyArray read_npy(const std::string& path);
// Parses one .npy image held in memory; `what` names it in error messages.
NpyArray parse_npy(const std::uint8_t* data, std::size_t size, const std::string& what);
// The .npy image of an array (format 1.0, or 2.0 when the header is too long for 1.0).
std::vector<std::uint8_t> npy_bytes(const NpyArray& a);

// Writers go through PATH + ".tmp" and a rename, so a failed write never leaves a partial PATH.
void write_npz(const std::string& path, const std::map<std::string, NpyArray>& arrays,
               bool compress = true);
void write_npy(const std::string& path, const NpyArray& a);

}  // namespace dfm
