#include "data/npz.hpp"

#include <zip.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "core/error.hpp"

namespace dfm {

// The raw bytes are used as little-endian values directly.
static_assert(std::endian::native == std::endian::little, "npz I/O assumes a little-endian host");

namespace {

constexpr char kMagic[] = "\x93NUMPY";  // 6 bytes, then major and minor version bytes
constexpr std::size_t kMagicLen = 6;
constexpr const char* kSupported = "<f4, <f8, <i4, <i8, |u1, |b1, <U<n>";

std::string shape_str(const std::vector<Index>& shape) {
  std::ostringstream os;
  os << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ',';  // Python's one-element tuple
  os << ')';
  return os.str();
}

// Product of non-negative dims, failing instead of overflowing (shapes come from files).
Index checked_numel(const std::vector<Index>& shape, const std::string& what) {
  Index n = 1;
  for (Index d : shape) {
    DFM_CHECK(d >= 0, what, ": negative dimension in shape ", shape_str(shape));
    DFM_CHECK(!__builtin_mul_overflow(n, d, &n), what, ": shape ", shape_str(shape),
              " is too large");
  }
  return n;
}

std::string errno_text(int err) { return std::strerror(err); }

// ---- .npy header parsing -------------------------------------------------------------------
// The header is a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2708, 1433), }
// We parse exactly that grammar rather than searching for substrings, so malformed headers are
// reported instead of misread.
struct HeaderParser {
  const std::string& s;
  const std::string& what;
  std::size_t i = 0;

  [[noreturn]] void bad(const std::string& expected) const {
    fail(what, ": malformed .npy header: expected ", expected, " at offset ", i, " in \"", s, "\"");
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool peek(char c) {
    ws();
    return i < s.size() && s[i] == c;
  }
  void expect(char c, const char* desc) {
    if (!peek(c)) bad(desc);
    ++i;
  }
  std::string str() {
    ws();
    if (i >= s.size() || (s[i] != '\'' && s[i] != '"')) bad("a quoted string");
    char q = s[i++];
    std::size_t end = s.find(q, i);
    if (end == std::string::npos) bad("a closing quote");
    std::string out = s.substr(i, end - i);
    i = end + 1;
    return out;
  }
  bool boolean() {
    ws();
    if (s.compare(i, 4, "True") == 0) return i += 4, true;
    if (s.compare(i, 5, "False") == 0) return i += 5, false;
    bad("True or False for 'fortran_order'");
  }
  // A tuple of non-negative integers: (), (n,), (a, b), (a, b,) ... An 'L' suffix (Python 2
  // longs, written by very old numpy) is accepted.
  [[noreturn]] void bad_shape(const char* why) const {
    fail(what, ": bad shape in .npy header (", why,
         "): expected a tuple of non-negative integers such as (2708, 1433), got \"",
         s.substr(i, std::min<std::size_t>(40, s.size() - i)), "\"");
  }
  std::vector<Index> shape() {
    ws();
    if (i >= s.size() || s[i] != '(') bad_shape("no opening parenthesis");
    ++i;
    std::vector<Index> dims;
    for (;;) {
      ws();
      if (i < s.size() && s[i] == ')') break;
      if (i >= s.size() || s[i] < '0' || s[i] > '9') bad_shape("not a non-negative integer");
      Index v = 0;
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
        if (__builtin_mul_overflow(v, Index{10}, &v) ||
            __builtin_add_overflow(v, Index{s[i] - '0'}, &v))
          bad_shape("dimension too large");
        ++i;
      }
      if (i < s.size() && s[i] == 'L') ++i;
      dims.push_back(v);
      ws();
      if (i < s.size() && s[i] == ',') {
        ++i;
        continue;
      }
      ws();
      if (i < s.size() && s[i] == ')') break;
      bad_shape("expected ',' or ')'");
    }
    ++i;  // ')'
    return dims;
  }
};

struct DescrInfo {
  DType dtype;
  Index char_width = 0;
};

// Maps a numpy dtype string to DType. '<' is little-endian, '=' native (little here), '|' "not
// applicable" (numpy writes it for one-byte types).
DescrInfo parse_descr(const std::string& d, const std::string& what) {
  auto unsupported = [&](const std::string& why) {
    fail(what, ": unsupported dtype '", d, "'", why, " (supported: ", kSupported, ")");
  };
  if (d.empty()) unsupported("");
  char order = d[0];
  std::string t = d.substr(1);
  if (order == '>')
    unsupported(": big-endian data is not supported; re-save with arr.astype(arr.dtype.newbyteorder('<'))");
  if (order != '<' && order != '=' && order != '|') unsupported("");
  bool one_byte = t == "u1" || t == "b1";
  // '|' is only meaningful for one-byte types; numpy never writes '|f4'.
  if (order == '|' && !one_byte) unsupported("");
  if (t == "f4") return {DType::f32};
  if (t == "f8") return {DType::f64};
  if (t == "i4") return {DType::i32};
  if (t == "i8") return {DType::i64};
  if (t == "u1") return {DType::u8};
  if (t == "b1") return {DType::b1};
  if (t.size() >= 2 && t[0] == 'U' &&
      std::all_of(t.begin() + 1, t.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
      t.size() <= 10) {
    return {DType::unicode, std::stoll(t.substr(1))};
  }
  unsupported("");
  DFM_ASSERT(false);  // unsupported() throws
  return {};
}

// ---- .npy header writing -------------------------------------------------------------------

std::string descr_of(DType t, Index char_width) {
  switch (t) {
    case DType::f32: return "<f4";
    case DType::f64: return "<f8";
    case DType::i32: return "<i4";
    case DType::i64: return "<i8";
    case DType::u8: return "|u1";
    case DType::b1: return "|b1";
    case DType::unicode: return "<U" + std::to_string(char_width);
  }
  DFM_ASSERT(false);
  return {};
}

template <typename T>
std::vector<T> raw_as(const std::vector<std::uint8_t>& bytes) {
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

template <typename Dst>
std::vector<Dst> convert(const NpyArray& a, const std::string& what, bool allow_float) {
  auto cast = [](const auto& src) {
    std::vector<Dst> out(src.size());
    for (std::size_t k = 0; k < src.size(); ++k) out[k] = static_cast<Dst>(src[k]);
    return out;
  };
  switch (a.dtype) {
    case DType::f32:
      if (!allow_float) break;
      return cast(raw_as<float>(a.bytes));
    case DType::f64:
      if (!allow_float) break;
      return cast(raw_as<double>(a.bytes));
    case DType::i32: return cast(raw_as<std::int32_t>(a.bytes));
    case DType::i64: return cast(raw_as<std::int64_t>(a.bytes));
    case DType::u8: return cast(a.bytes);
    case DType::b1: {  // numpy bools are bytes 0/1; treat any nonzero byte as true
      std::vector<Dst> out(a.bytes.size());
      for (std::size_t k = 0; k < out.size(); ++k) out[k] = a.bytes[k] ? Dst(1) : Dst(0);
      return out;
    }
    case DType::unicode: break;
  }
  fail(what, ": has dtype ", a.descr(), ", expected ",
       allow_float ? "a numeric dtype (<f4, <f8, <i4, <i8, |u1, |b1)"
                   : "an integer dtype (<i8, <i4, |u1, |b1)");
}

template <typename M>
M to_matrix(const NpyArray& a, const std::string& what,
            std::vector<typename M::Scalar> (NpyArray::*get)(const std::string&) const) {
  DFM_CHECK(a.shape.size() == 1 || a.shape.size() == 2, what, ": expected a 1-D or 2-D array, got shape ",
            shape_str(a.shape));
  Index r = a.shape[0], c = a.shape.size() == 2 ? a.shape[1] : 1;
  auto v = (a.*get)(what);
  return Eigen::Map<const M>(v.data(), r, c);
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::vector<std::uint8_t> read_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail("cannot open '", path, "': Is a directory");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open '", path, "': ", errno_text(errno));
  std::vector<std::uint8_t> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  DFM_CHECK(!f.bad(), "cannot read '", path, "'");
  return data;
}

// Removes the temp file unless released (i.e. unless the write completed and was renamed).
struct TmpGuard {
  std::string path;
  bool armed = true;
  ~TmpGuard() {
    if (armed) {
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
  }
};

void commit_tmp(TmpGuard& tmp, const std::string& path) {
  std::error_code ec;
  std::filesystem::rename(tmp.path, path, ec);
  DFM_CHECK(!ec, "cannot write '", path, "': rename from '", tmp.path, "' failed: ", ec.message());
  tmp.armed = false;
}

struct ZipCloser {
  void operator()(zip_t* z) const {
    if (z) zip_discard(z);
  }
};
using ZipPtr = std::unique_ptr<zip_t, ZipCloser>;

}  // namespace

// ---- NpyArray -------------------------------------------------------------------------------

Index NpyArray::numel() const { return checked_numel(shape, "array"); }

Index NpyArray::dim(int i) const {
  DFM_CHECK(i >= 0 && static_cast<std::size_t>(i) < shape.size(), "dimension ", i,
            " out of range for an array of shape ", shape_str(shape));
  return shape[static_cast<std::size_t>(i)];
}

std::size_t NpyArray::itemsize() const {
  switch (dtype) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
    case DType::u8: case DType::b1: return 1;
    case DType::unicode: return 4 * static_cast<std::size_t>(char_width);
  }
  DFM_ASSERT(false);
  return 0;
}

std::string NpyArray::descr() const { return descr_of(dtype, char_width); }

std::vector<float> NpyArray::to_f32(const std::string& what) const {
  if (dtype == DType::f32) return raw_as<float>(bytes);
  return convert<float>(*this, what, true);
}

std::vector<double> NpyArray::to_f64(const std::string& what) const {
  if (dtype == DType::f64) return raw_as<double>(bytes);
  return convert<double>(*this, what, true);
}

std::vector<std::int64_t> NpyArray::to_i64(const std::string& what) const {
  if (dtype == DType::i64) return raw_as<std::int64_t>(bytes);
  return convert<std::int64_t>(*this, what, false);
}

Mat NpyArray::to_mat(const std::string& what) const {
  return to_matrix<Mat>(*this, what, &NpyArray::to_f32);
}

MatD NpyArray::to_matd(const std::string& what) const {
  return to_matrix<MatD>(*this, what, &NpyArray::to_f64);
}

std::string NpyArray::to_string(const std::string& what) const {
  DFM_CHECK(dtype == DType::unicode, what, ": has dtype ", descr(), ", expected a string (<U<n>)");
  DFM_CHECK(shape.empty(), what, ": expected a 0-d string array, got shape ", shape_str(shape));
  auto cps = raw_as<std::uint32_t>(bytes);
  // numpy pads strings shorter than the field width with NUL code points.
  while (!cps.empty() && cps.back() == 0) cps.pop_back();
  std::string out;
  for (std::uint32_t cp : cps) {
    DFM_CHECK(cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF), what,
              ": invalid Unicode code point ", cp);
    append_utf8(out, cp);
  }
  return out;
}

NpyArray NpyArray::from_f32(std::vector<Index> shape, const float* data) {
  NpyArray a;
  a.dtype = DType::f32;
  a.shape = std::move(shape);
  a.bytes.resize(static_cast<std::size_t>(a.numel()) * sizeof(float));
  if (!a.bytes.empty()) std::memcpy(a.bytes.data(), data, a.bytes.size());
  return a;
}

NpyArray NpyArray::from_f64(std::vector<Index> shape, const double* data) {
  NpyArray a;
  a.dtype = DType::f64;
  a.shape = std::move(shape);
  a.bytes.resize(static_cast<std::size_t>(a.numel()) * sizeof(double));
  if (!a.bytes.empty()) std::memcpy(a.bytes.data(), data, a.bytes.size());
  return a;
}

NpyArray NpyArray::from_i64(std::vector<Index> shape, const std::int64_t* data) {
  NpyArray a;
  a.dtype = DType::i64;
  a.shape = std::move(shape);
  a.bytes.resize(static_cast<std::size_t>(a.numel()) * sizeof(std::int64_t));
  if (!a.bytes.empty()) std::memcpy(a.bytes.data(), data, a.bytes.size());
  return a;
}

NpyArray NpyArray::from_string(const std::string& utf8) {
  std::vector<std::uint32_t> cps;
  for (std::size_t i = 0; i < utf8.size();) {
    auto c = static_cast<unsigned char>(utf8[i]);
    int extra = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : -1;
    DFM_CHECK(extra >= 0 && i + static_cast<std::size_t>(extra) < utf8.size(),
              "NpyArray::from_string: invalid UTF-8 at byte ", i);
    std::uint32_t cp = extra == 0 ? c : c & (0x3F >> extra);
    for (int k = 1; k <= extra; ++k) {
      auto cc = static_cast<unsigned char>(utf8[i + static_cast<std::size_t>(k)]);
      DFM_CHECK((cc & 0xC0) == 0x80, "NpyArray::from_string: invalid UTF-8 at byte ", i);
      cp = (cp << 6) | (cc & 0x3F);
    }
    cps.push_back(cp);
    i += static_cast<std::size_t>(extra) + 1;
  }
  NpyArray a;
  a.dtype = DType::unicode;
  // numpy gives '' the dtype '<U1' (one NUL), never '<U0'.
  a.char_width = std::max<Index>(1, static_cast<Index>(cps.size()));
  a.bytes.assign(a.itemsize(), 0);
  if (!cps.empty()) std::memcpy(a.bytes.data(), cps.data(), cps.size() * 4);
  return a;
}

// ---- Npz ------------------------------------------------------------------------------------

bool Npz::has(const std::string& name) const { return arrays.count(name) != 0; }

const NpyArray& Npz::at(const std::string& name) const {
  auto it = arrays.find(name);
  if (it != arrays.end()) return it->second;
  std::string names;
  for (const auto& kv : arrays) names += (names.empty() ? "" : ", ") + kv.first;
  fail(path, ": no array '", name, "' (has: ", names, ")");
}

// ---- parsing --------------------------------------------------------------------------------

NpyArray parse_npy(const std::uint8_t* data, std::size_t size, const std::string& what) {
  DFM_CHECK(size >= kMagicLen + 2 && std::memcmp(data, kMagic, kMagicLen) == 0, what,
            ": not a .npy file (bad magic; expected the bytes \\x93NUMPY at the start)");
  int major = data[6], minor = data[7];
  DFM_CHECK((major == 1 || major == 2 || major == 3) && minor == 0, what,
            ": unsupported .npy format version ", major, ".", minor, " (supported: 1.0, 2.0, 3.0)");
  // 1.0 has a 2-byte header length, 2.0 and 3.0 (UTF-8 header) a 4-byte one; little-endian.
  std::size_t len_bytes = major == 1 ? 2 : 4;
  std::size_t prefix = kMagicLen + 2 + len_bytes;
  DFM_CHECK(size >= prefix, what, ": .npy header truncated (file is ", size, " bytes)");
  std::size_t header_len = 0;
  for (std::size_t k = 0; k < len_bytes; ++k)
    header_len |= static_cast<std::size_t>(data[kMagicLen + 2 + k]) << (8 * k);
  DFM_CHECK(size - prefix >= header_len, what, ": .npy header truncated (header says ", header_len,
            " bytes, only ", size - prefix, " present)");
  std::string header(reinterpret_cast<const char*>(data + prefix), header_len);

  HeaderParser p{header, what};
  std::string descr;
  bool fortran = false, have_descr = false, have_fortran = false, have_shape = false;
  std::vector<Index> shape;
  p.expect('{', "'{'");
  while (!p.peek('}')) {
    std::string key = p.str();
    p.expect(':', "':'");
    if (key == "descr") {
      // A list here is a structured (record) dtype.
      if (p.peek('['))
        fail(what, ": unsupported dtype: structured/record arrays are not supported (supported: ",
             kSupported, ")");
      descr = p.str();
      have_descr = true;
    } else if (key == "fortran_order") {
      fortran = p.boolean();
      have_fortran = true;
    } else if (key == "shape") {
      shape = p.shape();
      have_shape = true;
    } else {
      p.bad("one of the keys 'descr', 'fortran_order', 'shape' (got '" + key + "')");
    }
    if (!p.peek(',')) break;
    ++p.i;
  }
  p.expect('}', "'}'");
  DFM_CHECK(have_descr && have_fortran && have_shape, what,
            ": .npy header lacks one of 'descr', 'fortran_order', 'shape': \"", header, "\"");

  DescrInfo d = parse_descr(descr, what);
  DFM_CHECK(!fortran, what, ": fortran_order=True arrays are not supported (expected C order; "
            "re-save with np.ascontiguousarray)");

  NpyArray a;
  a.dtype = d.dtype;
  a.char_width = d.char_width;
  a.shape = std::move(shape);
  Index numel = checked_numel(a.shape, what);
  Index expected = 0;
  DFM_CHECK(!__builtin_mul_overflow(numel, static_cast<Index>(a.itemsize()), &expected), what,
            ": shape ", shape_str(a.shape), " is too large");
  std::size_t payload = size - prefix - header_len;
  DFM_CHECK(payload == static_cast<std::size_t>(expected), what, ": payload is ", payload,
            " bytes but shape ", shape_str(a.shape), " of ", descr, " needs ", expected, " bytes (",
            payload < static_cast<std::size_t>(expected) ? "truncated" : "trailing data", ")");
  a.bytes.assign(data + prefix + header_len, data + size);
  return a;
}

NpyArray read_npy(const std::string& path) {
  auto data = read_file(path);
  return parse_npy(data.data(), data.size(), path);
}

Npz read_npz(const std::string& path) {
  {
    // Existence and permission problems are reported with errno's words (libzip's are vaguer).
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) fail("cannot open '", path, "': Is a directory");
    std::ifstream probe(path, std::ios::binary);
    if (!probe) fail("cannot open '", path, "': ", errno_text(errno));
  }
  int zerr = 0;
  ZipPtr za(zip_open(path.c_str(), ZIP_RDONLY, &zerr));
  if (!za) {
    if (zerr == ZIP_ER_NOZIP)
      fail("cannot read '", path, "': not a zip archive (expected an .npz written by numpy.savez)");
    zip_error_t ze;
    zip_error_init_with_code(&ze, zerr);
    std::string msg = zip_error_strerror(&ze);
    zip_error_fini(&ze);
    fail("cannot read '", path, "' as an .npz (zip) archive: ", msg);
  }

  Npz npz;
  npz.path = path;
  zip_int64_t n = zip_get_num_entries(za.get(), 0);
  for (zip_int64_t k = 0; k < n; ++k) {
    zip_stat_t st;
    zip_stat_init(&st);
    DFM_CHECK(zip_stat_index(za.get(), static_cast<zip_uint64_t>(k), 0, &st) == 0, path,
              ": cannot stat zip member ", k, ": ", zip_strerror(za.get()));
    std::string member = st.name ? st.name : "";
    if (!member.empty() && member.back() == '/') continue;  // directory entry
    std::string key = member;
    if (key.size() >= 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    std::string what = path + ":" + key;
    DFM_CHECK(!npz.arrays.count(key), what, ": duplicate member in archive");

    std::vector<std::uint8_t> buf(static_cast<std::size_t>(st.size));
    zip_file_t* zf = zip_fopen_index(za.get(), static_cast<zip_uint64_t>(k), 0);
    DFM_CHECK(zf, what, ": cannot open zip member: ", zip_strerror(za.get()));
    std::size_t got = 0;
    while (got < buf.size()) {
      zip_int64_t r = zip_fread(zf, buf.data() + got, buf.size() - got);
      if (r <= 0) {
        std::string msg = r < 0 ? zip_file_strerror(zf) : "unexpected end of data";
        zip_fclose(zf);
        fail(what, ": cannot read zip member (", msg, ")");
      }
      got += static_cast<std::size_t>(r);
    }
    // Closing reports a CRC mismatch (corrupt member) once all data has been read.
    int cerr = zip_fclose(zf);
    DFM_CHECK(cerr == 0, what, ": corrupt zip member (libzip error ", cerr, ")");
    npz.arrays.emplace(key, parse_npy(buf.data(), buf.size(), what));
  }
  return npz;
}

// ---- writing --------------------------------------------------------------------------------

std::vector<std::uint8_t> npy_bytes(const NpyArray& a) {
  Index numel = checked_numel(a.shape, "npy_bytes");
  DFM_CHECK(a.dtype != DType::unicode || a.char_width >= 0, "npy_bytes: negative char_width");
  DFM_CHECK(static_cast<std::size_t>(numel) * a.itemsize() == a.bytes.size(),
            "npy_bytes: array of shape ", shape_str(a.shape), " and dtype ", a.descr(), " has ",
            a.bytes.size(), " bytes, expected ", static_cast<std::size_t>(numel) * a.itemsize());
  std::string dict = "{'descr': '" + a.descr() + "', 'fortran_order': False, 'shape': " +
                     shape_str(a.shape) + ", }";
  // Pad with spaces and end with '\n' so the data starts at a multiple of 64 bytes, as numpy
  // does (readers may then map the data aligned). Version 2.0 only if 1.0's 16-bit length
  // cannot hold the header.
  int major = dict.size() + 1 + 10 < 65536 ? 1 : 2;
  std::size_t prefix = major == 1 ? 10 : 12;
  std::size_t total = prefix + dict.size() + 1;
  total = (total + 63) / 64 * 64;
  std::size_t header_len = total - prefix;
  dict.append(header_len - dict.size() - 1, ' ');
  dict += '\n';

  // Filled with memcpy into a presized buffer (vector::insert here trips a GCC 12
  // -Wstringop-overflow false positive).
  std::vector<std::uint8_t> out(total + a.bytes.size());
  std::memcpy(out.data(), kMagic, kMagicLen);
  out[6] = static_cast<std::uint8_t>(major);
  out[7] = 0;
  for (std::size_t k = 0; k < prefix - 8; ++k)
    out[8 + k] = static_cast<std::uint8_t>(header_len >> (8 * k));
  std::memcpy(out.data() + prefix, dict.data(), dict.size());
  if (!a.bytes.empty()) std::memcpy(out.data() + total, a.bytes.data(), a.bytes.size());
  return out;
}

void write_npy(const std::string& path, const NpyArray& a) {
  auto data = npy_bytes(a);
  TmpGuard tmp{path + ".tmp"};
  {
    std::ofstream f(tmp.path, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot write '", path, "': cannot create '", tmp.path, "': ", errno_text(errno));
    f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    f.close();
    DFM_CHECK(f, "cannot write '", path, "': write to '", tmp.path, "' failed");
  }
  commit_tmp(tmp, path);
}

void write_npz(const std::string& path, const std::map<std::string, NpyArray>& arrays,
               bool compress) {
  TmpGuard tmp{path + ".tmp"};
  if (arrays.empty()) {
    // libzip deletes rather than writes an archive with no entries; numpy's empty savez is a
    // lone end-of-central-directory record (22 bytes, signature PK\5\6, all counts zero).
    std::ofstream f(tmp.path, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot write '", path, "': cannot create '", tmp.path, "': ", errno_text(errno));
    const char eocd[22] = {'P', 'K', 5, 6};
    f.write(eocd, sizeof eocd);
    f.close();
    DFM_CHECK(f, "cannot write '", path, "': write to '", tmp.path, "' failed");
    commit_tmp(tmp, path);
    return;
  }

  int zerr = 0;
  ZipPtr za(zip_open(tmp.path.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &zerr));
  if (!za) {
    zip_error_t ze;
    zip_error_init_with_code(&ze, zerr);
    std::string msg = zip_error_strerror(&ze);
    zip_error_fini(&ze);
    fail("cannot write '", path, "': cannot create '", tmp.path, "': ", msg);
  }
  // libzip reads the sources only in zip_close, so the images must outlive it.
  std::vector<std::vector<std::uint8_t>> images;
  images.reserve(arrays.size());
  for (const auto& [name, a] : arrays) {
    DFM_CHECK(!name.empty(), "cannot write '", path, "': empty array name");
    images.push_back(npy_bytes(a));
    const auto& img = images.back();
    zip_source_t* src = zip_source_buffer(za.get(), img.data(), img.size(), 0);
    DFM_CHECK(src, "cannot write '", path, "': ", zip_strerror(za.get()));
    zip_int64_t idx = zip_file_add(za.get(), (name + ".npy").c_str(), src, ZIP_FL_ENC_UTF_8);
    if (idx < 0) {
      zip_source_free(src);
      fail("cannot write '", path, "': cannot add '", name, ".npy': ", zip_strerror(za.get()));
    }
    DFM_CHECK(zip_set_file_compression(za.get(), static_cast<zip_uint64_t>(idx),
                                       compress ? ZIP_CM_DEFLATE : ZIP_CM_STORE, 0) == 0,
              "cannot write '", path, "': ", zip_strerror(za.get()));
  }
  if (zip_close(za.get()) != 0)
    fail("cannot write '", path, "': ", zip_strerror(za.get()));  // za still owned: discarded
  za.release();  // closed successfully; nothing left to discard
  commit_tmp(tmp, path);
}

}  // namespace dfm
