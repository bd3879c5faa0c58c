#include "data/ogb.hpp"

#include <zip.h>
#include <zlib.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <numeric>

#include "core/error.hpp"

namespace fs = std::filesystem;

namespace dfm {

bool NodeTargets::labelled(Index i) const {
  if (!multilabel) return y[static_cast<size_t>(i)] >= 0;
  for (Index t = 0; t < ym.cols(); ++t)
    if (!std::isnan(ym(i, t))) return true;
  return false;
}

NodeTargets NodeTargets::gather(const std::vector<std::int64_t>& nodes) const {
  NodeTargets out;
  out.multilabel = multilabel;
  out.classes = classes;
  const Index m = static_cast<Index>(nodes.size());
  if (multilabel) {
    out.ym.resize(m, ym.cols());
#pragma omp parallel for schedule(static) if (m > 4096)
    for (Index p = 0; p < m; ++p) out.ym.row(p) = ym.row(nodes[p]);
  } else {
    out.y.resize(static_cast<size_t>(m));
    for (Index p = 0; p < m; ++p) out.y[p] = y[nodes[p]];
  }
  return out;
}

namespace {

// ---- small helpers ---------------------------------------------------------------------------
std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// Uniform in [0, bound) by 128-bit multiply with rejection (Lemire): exact, portable.
std::uint64_t bounded(std::uint64_t& state, std::uint64_t bound) {
  for (;;) {
    const std::uint64_t r = splitmix64(state);
    const unsigned __int128 m = static_cast<unsigned __int128>(r) * bound;
    const std::uint64_t lo = static_cast<std::uint64_t>(m);
    if (lo >= bound || lo >= (-bound) % bound) return static_cast<std::uint64_t>(m >> 64);
  }
}

std::string shape_text(const std::vector<Index>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// ---- streaming .npz reading -----------------------------------------------------------------
struct ZipDiscard {
  void operator()(zip_t* z) const {
    if (z) zip_discard(z);
  }
};
struct ZipFileClose {
  void operator()(zip_file_t* f) const {
    if (f) zip_fclose(f);
  }
};

struct NpyHeader {
  std::string descr;
  bool fortran = false;
  std::vector<Index> shape;
  Index numel() const {
    Index n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::size_t itemsize() const { return static_cast<std::size_t>(std::stoul(descr.substr(2))); }
};

// Parses the dict of a .npy header: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
NpyHeader parse_header_dict(const std::string& h, const std::string& what) {
  NpyHeader out;
  auto value_after = [&](const char* key) -> size_t {
    const size_t k = h.find(key);
    DFM_CHECK(k != std::string::npos, what, ": malformed .npy header (no ", key, "): ", h);
    size_t c = h.find(':', k);
    DFM_CHECK(c != std::string::npos, what, ": malformed .npy header: ", h);
    ++c;
    while (c < h.size() && h[c] == ' ') ++c;
    return c;
  };
  size_t p = value_after("'descr'");
  DFM_CHECK(p < h.size() && (h[p] == '\'' || h[p] == '"'), what, ": malformed descr in .npy header: ", h);
  const size_t q = h.find(h[p], p + 1);
  DFM_CHECK(q != std::string::npos, what, ": malformed descr in .npy header: ", h);
  out.descr = h.substr(p + 1, q - p - 1);
  p = value_after("'fortran_order'");
  out.fortran = h.compare(p, 4, "True") == 0;
  p = value_after("'shape'");
  DFM_CHECK(p < h.size() && h[p] == '(', what, ": malformed shape in .npy header: ", h);
  const size_t close = h.find(')', p);
  DFM_CHECK(close != std::string::npos, what, ": malformed shape in .npy header: ", h);
  std::string dims = h.substr(p + 1, close - p - 1);
  size_t s = 0;
  while (s < dims.size()) {
    while (s < dims.size() && (dims[s] == ' ' || dims[s] == ',')) ++s;
    if (s >= dims.size()) break;
    Index v = 0;
    auto [ptr, ec] = std::from_chars(dims.data() + s, dims.data() + dims.size(), v);
    DFM_CHECK(ec == std::errc() && v >= 0, what, ": malformed shape in .npy header: ", h);
    out.shape.push_back(v);
    s = static_cast<size_t>(ptr - dims.data());
  }
  DFM_CHECK(!out.fortran, what, ": Fortran-order arrays are not supported (save with numpy C order)");
  DFM_CHECK(out.descr.size() >= 3 && (out.descr[0] == '<' || out.descr[0] == '|'), what, ": dtype '", out.descr,
            "' is not supported (little-endian numeric only)");
  return out;
}

class NpzReader {
 public:
  explicit NpzReader(const std::string& path) : path_(path) {
    std::error_code ec;
    DFM_CHECK(fs::exists(path, ec), "cannot open '", path, "': no such file");
    DFM_CHECK(!fs::is_directory(path, ec), "cannot open '", path, "': is a directory (an OGB directory needs raw/)");
    int err = 0;
    za_.reset(zip_open(path.c_str(), ZIP_RDONLY, &err));
    DFM_CHECK(za_, "cannot read '", path, "': not a readable .npz (zip) archive (libzip error ", err, ")");
  }
  bool has(const std::string& name) const { return zip_name_locate(za_.get(), (name + ".npy").c_str(), 0) >= 0; }

  // Opens a member and reads its header; then read() streams its payload.
  NpyHeader open(const std::string& name) {
    what_ = path_ + ": " + name;
    const zip_int64_t idx = zip_name_locate(za_.get(), (name + ".npy").c_str(), 0);
    DFM_CHECK(idx >= 0, path_, ": no array '", name, "'");
    file_.reset(zip_fopen_index(za_.get(), static_cast<zip_uint64_t>(idx), 0));
    DFM_CHECK(file_, what_, ": cannot open zip member: ", zip_strerror(za_.get()));
    std::uint8_t pre[10];
    read_exact(pre, 8);
    DFM_CHECK(std::memcmp(pre, "\x93NUMPY", 6) == 0, what_, ": not a .npy member (bad magic)");
    std::size_t hlen = 0;
    if (pre[6] == 1) {
      read_exact(pre + 8, 2);
      hlen = pre[8] | (static_cast<std::size_t>(pre[9]) << 8);
    } else {
      std::uint8_t l4[4];
      read_exact(l4, 4);
      hlen = l4[0] | (l4[1] << 8) | (static_cast<std::size_t>(l4[2]) << 16) | (static_cast<std::size_t>(l4[3]) << 24);
    }
    std::string h(hlen, '\0');
    read_exact(reinterpret_cast<std::uint8_t*>(h.data()), hlen);
    return parse_header_dict(h, what_);
  }
  void read_exact(void* dst, std::size_t bytes) {
    auto* p = static_cast<std::uint8_t*>(dst);
    std::size_t got = 0;
    while (got < bytes) {
      const zip_int64_t r = zip_fread(file_.get(), p + got, bytes - got);
      DFM_CHECK(r > 0, what_, ": truncated or corrupt member (read ", got, " of ", bytes, " bytes)");
      got += static_cast<std::size_t>(r);
    }
  }
  // Streams `count` elements of type Raw through fn(const Raw* chunk, size_t n, size_t offset).
  template <typename Raw, typename Fn>
  void stream(std::size_t count, Fn&& fn) {
    constexpr std::size_t kChunk = 1 << 20;
    std::vector<Raw> buf(std::min(count, kChunk));
    for (std::size_t off = 0; off < count; off += kChunk) {
      const std::size_t k = std::min(kChunk, count - off);
      read_exact(buf.data(), k * sizeof(Raw));
      fn(buf.data(), k, off);
    }
  }
  const std::string& what() const { return what_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_, what_;
  std::unique_ptr<zip_t, ZipDiscard> za_;
  std::unique_ptr<zip_file_t, ZipFileClose> file_;
};

// Reads a numeric member into T with conversion; any of f4 f8 i4 i8 u1 b1.
template <typename T, typename Fn>
void stream_as(NpzReader& r, const NpyHeader& h, Fn&& fn) {
  const std::size_t n = static_cast<std::size_t>(h.numel());
  auto go = [&](auto tag) {
    using Raw = decltype(tag);
    r.stream<Raw>(n, [&](const Raw* p, std::size_t k, std::size_t off) { fn(p, k, off); });
  };
  const std::string& d = h.descr;
  if (d == "<f4") go(float{});
  else if (d == "<f8") go(double{});
  else if (d == "<i4") go(std::int32_t{});
  else if (d == "<i8") go(std::int64_t{});
  else if (d == "|u1" || d == "|b1") go(std::uint8_t{});
  else fail(r.what(), ": dtype '", d, "' is not supported here");
}

std::vector<std::int64_t> read_index_array(NpzReader& r, const std::string& name, Index n, std::vector<Index>* shape) {
  const NpyHeader h = r.open(name);
  DFM_CHECK(h.descr == "<i8" || h.descr == "<i4", r.what(), ": dtype ", h.descr, ", expected int64");
  DFM_CHECK(h.shape.size() == 1 || h.shape.size() == 2, r.what(), ": shape ", shape_text(h.shape),
            ", expected [n] or [runs, n]");
  std::vector<std::int64_t> out(static_cast<size_t>(h.numel()));
  stream_as<std::int64_t>(r, h, [&](const auto* p, std::size_t k, std::size_t off) {
    for (std::size_t i = 0; i < k; ++i) {
      const auto v = static_cast<std::int64_t>(p[i]);
      DFM_CHECK(v >= 0 && v < n, r.what(), ": index ", v, " at position ", off + i, " out of range [0, ", n, ")");
      out[off + i] = v;
    }
  });
  *shape = h.shape;
  return out;
}

// ---- gzip text (OGB raw CSVs) ---------------------------------------------------------------
class GzLines {
 public:
  explicit GzLines(const std::string& path) : path_(path) {
    f_ = gzopen(path.c_str(), "rb");
    DFM_CHECK(f_, "cannot open '", path, "'");
    gzbuffer(f_, 1 << 20);
    buf_.resize(1 << 22);
  }
  ~GzLines() {
    if (f_) gzclose(f_);
  }
  GzLines(const GzLines&) = delete;
  GzLines& operator=(const GzLines&) = delete;

  // The next non-empty line (without the newline); false at the end.
  bool next(std::string_view& line) {
    for (;;) {
      const char* start = buf_.data() + begin_;
      const void* nl = std::memchr(start, '\n', end_ - begin_);
      if (nl) {
        const size_t len = static_cast<const char*>(nl) - start;
        line = std::string_view(start, len);
        begin_ += len + 1;
        ++line_no_;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.empty()) continue;
        return true;
      }
      if (eof_) {
        if (begin_ == end_) return false;
        line = std::string_view(start, end_ - begin_);
        begin_ = end_;
        ++line_no_;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.empty()) return false;
        return true;
      }
      // Move the partial line to the front (growing the buffer for very long lines) and refill.
      const size_t rest = end_ - begin_;
      std::memmove(buf_.data(), start, rest);
      begin_ = 0;
      end_ = rest;
      if (end_ == buf_.size()) buf_.resize(buf_.size() * 2);
      const int got = gzread(f_, buf_.data() + end_, static_cast<unsigned>(buf_.size() - end_));
      if (got < 0) {
        int errnum = 0;
        const char* msg = gzerror(f_, &errnum);
        fail("cannot read '", path_, "': ", msg ? msg : "gzip error");
      }
      if (got == 0) eof_ = true;
      end_ += static_cast<size_t>(got);
    }
  }
  Index line_no() const { return line_no_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  gzFile f_ = nullptr;
  std::vector<char> buf_;
  size_t begin_ = 0, end_ = 0;
  bool eof_ = false;
  Index line_no_ = 0;
};

// Splits a CSV line into numbers; returns how many fields were parsed into out (resized).
template <typename T>
void parse_fields(std::string_view line, std::vector<T>& out, const GzLines& src) {
  out.clear();
  const char* p = line.data();
  const char* end = p + line.size();
  while (p <= end) {
    while (p < end && *p == ' ') ++p;
    const char* comma = static_cast<const char*>(std::memchr(p, ',', end - p));
    const char* fe = comma ? comma : end;
    T v{};
    if constexpr (std::is_floating_point_v<T>) {
      // "nan" (OGB's marker of a missing label) parses as NaN through from_chars.
      auto [ptr, ec] = std::from_chars(p, fe, v);
      DFM_CHECK(ec == std::errc() && (ptr == fe || *ptr == ' '), src.path(), ":", src.line_no(), ": cannot parse '",
                std::string(p, fe), "' as a number");
    } else {
      auto [ptr, ec] = std::from_chars(p, fe, v);
      DFM_CHECK(ec == std::errc() && (ptr == fe || *ptr == ' '), src.path(), ":", src.line_no(), ": cannot parse '",
                std::string(p, fe), "' as an integer");
    }
    out.push_back(v);
    if (!comma) break;
    p = comma + 1;
  }
}

std::string find_csv(const fs::path& dir, const std::string& stem, bool required) {
  for (const char* ext : {".csv.gz", ".csv"}) {
    const fs::path p = dir / (stem + ext);
    std::error_code ec;
    if (fs::exists(p, ec)) return p.string();
  }
  DFM_CHECK(!required, "OGB directory: missing ", (dir / (stem + ".csv.gz")).string());
  return {};
}

std::vector<std::int64_t> read_index_csv(const std::string& path, Index n) {
  GzLines in(path);
  std::vector<std::int64_t> out, f;
  std::string_view line;
  while (in.next(line)) {
    parse_fields(line, f, in);
    DFM_CHECK(f.size() == 1, path, ":", in.line_no(), ": expected one node index per line");
    DFM_CHECK(f[0] >= 0 && f[0] < n, path, ":", in.line_no(), ": node ", f[0], " out of range [0, ", n, ")");
    out.push_back(f[0]);
  }
  return out;
}

void check_graph_ids(Index n, const std::vector<std::int32_t>& v, const std::string& what) {
  for (size_t e = 0; e < v.size(); ++e)
    DFM_CHECK(v[e] >= 0 && v[e] < n, what, ": edge ", e, " has node ", v[e], " out of range [0, ", n, ")");
}

}  // namespace

// ---- graph construction ------------------------------------------------------------------------
NodeGraph build_node_graph(Index n, const std::vector<std::int32_t>& src, const std::vector<std::int32_t>& dst,
                           const std::vector<float>& weight, const GraphPrep& prep, const std::string& what) {
  DFM_CHECK(src.size() == dst.size(), what, ": edge source and target lists differ in length");
  DFM_CHECK(weight.empty() || weight.size() == src.size(), what, ": edge_weight has ", weight.size(),
            " entries, expected one per edge (", src.size(), ")");
  DFM_CHECK(n <= std::numeric_limits<std::int32_t>::max(), what, ": ", n, " nodes exceed the int32 node ids");
  const bool weighted = !weight.empty();
  const size_t e_in = src.size();
  NodeGraph g;
  Csr& a = g.op.adj;
  a.rows = a.cols = n;
  a.indptr.assign(static_cast<size_t>(n) + 1, 0);
  auto keep = [&](size_t e) { return !(prep.self_loops && src[e] == dst[e]); };
  for (size_t e = 0; e < e_in; ++e) {
    if (!keep(e)) continue;
    ++a.indptr[static_cast<size_t>(dst[e]) + 1];
    if (prep.undirected) ++a.indptr[static_cast<size_t>(src[e]) + 1];
  }
  for (Index i = 0; i < n; ++i) a.indptr[i + 1] += a.indptr[i];
  const size_t total = static_cast<size_t>(a.indptr[n]);
  a.indices.resize(total);
  if (weighted) a.values.resize(total);
  {
    std::vector<Index> next(a.indptr.begin(), a.indptr.end() - 1);
    for (size_t e = 0; e < e_in; ++e) {  // stable: input order within each target row
      if (!keep(e)) continue;
      Index s = next[dst[e]]++;
      a.indices[s] = src[e];
      if (weighted) a.values[s] = weight[e];
      if (prep.undirected) {
        s = next[src[e]]++;
        a.indices[s] = dst[e];
        if (weighted) a.values[s] = weight[e];
      }
    }
  }
  if (prep.undirected) {
    // to_undirected coalesces: rows sorted by source, duplicates merged (weights summed).
    std::vector<Index> new_len(static_cast<size_t>(n));
#pragma omp parallel
    {
      std::vector<std::pair<std::int32_t, float>> row;
#pragma omp for schedule(dynamic, 1024)
      for (Index i = 0; i < n; ++i) {
        const Index lo = a.indptr[i], hi = a.indptr[i + 1];
        if (!weighted) {
          std::sort(a.indices.begin() + lo, a.indices.begin() + hi);
          new_len[i] = std::unique(a.indices.begin() + lo, a.indices.begin() + hi) - (a.indices.begin() + lo);
          continue;
        }
        row.clear();
        for (Index e = lo; e < hi; ++e) row.emplace_back(a.indices[e], a.values[e]);
        std::stable_sort(row.begin(), row.end(), [](auto& x, auto& y) { return x.first < y.first; });
        Index w = lo;
        for (size_t k = 0; k < row.size(); ++k) {
          if (w > lo && a.indices[w - 1] == row[k].first) {
            a.values[w - 1] += row[k].second;
          } else {
            a.indices[w] = row[k].first;
            a.values[w] = row[k].second;
            ++w;
          }
        }
        new_len[i] = w - lo;
      }
    }
    Index w = 0;
    for (Index i = 0; i < n; ++i) {
      const Index lo = a.indptr[i];
      if (w != lo) {
        std::memmove(a.indices.data() + w, a.indices.data() + lo, sizeof(std::int32_t) * new_len[i]);
        if (weighted) std::memmove(a.values.data() + w, a.values.data() + lo, sizeof(float) * new_len[i]);
      }
      a.indptr[i] = w;
      w += new_len[i];
    }
    a.indptr[n] = w;
    a.indices.resize(static_cast<size_t>(w));
    a.indices.shrink_to_fit();
    if (weighted) {
      a.values.resize(static_cast<size_t>(w));
      a.values.shrink_to_fit();
    }
  }
  if (prep.self_loops) {  // appended after each row's edges, weight 1 (add_self_loops)
    std::vector<std::int32_t> idx(a.indices.size() + static_cast<size_t>(n));
    std::vector<float> val(weighted ? idx.size() : 0);
    Index w = 0;
    for (Index i = 0; i < n; ++i) {
      const Index lo = a.indptr[i], hi = a.indptr[i + 1];
      std::copy(a.indices.begin() + lo, a.indices.begin() + hi, idx.begin() + w);
      if (weighted) std::copy(a.values.begin() + lo, a.values.begin() + hi, val.begin() + w);
      a.indptr[i] = w;
      w += hi - lo;
      idx[w] = static_cast<std::int32_t>(i);
      if (weighted) val[w] = 1.0f;
      ++w;
    }
    a.indptr[n] = w;
    a.indices = std::move(idx);
    a.values = std::move(val);
  }
  if (weighted) g.weight = std::move(a.values);
  a.values = normalised_values(a, g.weight);
  return g;
}

std::vector<float> normalised_values(const Csr& a, const std::vector<float>& weight) {
  const Index n = a.rows;
  const bool weighted = !weight.empty();
  std::vector<float> out(static_cast<size_t>(a.nnz()));
#pragma omp parallel for schedule(dynamic, 1024) if (n > 4096)
  for (Index i = 0; i < n; ++i) {
    const double di = static_cast<double>(a.indptr[i + 1] - a.indptr[i]);
    for (Index e = a.indptr[i]; e < a.indptr[i + 1]; ++e) {
      const Index j = a.indices[e];
      const double dj = static_cast<double>(a.indptr[j + 1] - a.indptr[j]);
      // the same expression as make_graph_op: inf for a zero degree, then set to 0
      double c = (1.0 / std::sqrt(di)) * (1.0 / std::sqrt(dj));
      if (weighted) c *= weight[e];
      if (!std::isfinite(c)) c = 0.0;
      out[e] = static_cast<float>(c);
    }
  }
  return out;
}

GraphOp full_graph_op(const NodeGraph& g) {
  GraphOp op;
  op.adj = g.op.adj;
  op.adj_t = csr_transpose(op.adj);
  return op;
}

Split ratio_split(const NodeTargets& t, double train, double val, std::uint64_t seed) {
  DFM_CHECK(train > 0 && val >= 0 && train + val < 1, "--split ratio:", train, ",", val,
            ": expected train > 0, valid >= 0 and train + valid < 1");
  std::vector<std::int64_t> lab;
  for (Index i = 0; i < t.rows(); ++i)
    if (t.labelled(i)) lab.push_back(i);
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ULL + 0x5851f42d4c957f2dULL;
  for (size_t i = lab.size(); i > 1; --i) std::swap(lab[i - 1], lab[bounded(state, i)]);
  const size_t nl = lab.size();
  const size_t ntr = static_cast<size_t>(std::floor(static_cast<double>(nl) * train));
  const size_t nva = static_cast<size_t>(std::floor(static_cast<double>(nl) * val));
  Split s;
  s.train.assign(lab.begin(), lab.begin() + ntr);
  s.val.assign(lab.begin() + ntr, lab.begin() + ntr + nva);
  s.test.assign(lab.begin() + ntr + nva, lab.end());
  return s;
}

// ---- .npz ----------------------------------------------------------------------------------------
LargeDataset load_large_npz(const std::string& path, const GraphPrep& prep) {
  NpzReader r(path);
  LargeDataset d;
  d.path = path;
  {
    const NpyHeader h = r.open("x");
    DFM_CHECK(h.shape.size() == 2, r.what(), ": shape ", shape_text(h.shape), ", expected [N, F]");
    DFM_CHECK(h.descr == "<f4" || h.descr == "<f8", r.what(), ": dtype ", h.descr, ", expected float32");
    d.n = h.shape[0];
    d.features = h.shape[1];
    DFM_CHECK(d.n > 0 && d.features > 0, r.what(), ": empty (shape ", shape_text(h.shape), ")");
    d.x.resize(d.n, d.features);
    float* out = d.x.data();
    bool finite = true;
    if (h.descr == "<f4") {
      r.read_exact(out, sizeof(float) * static_cast<size_t>(d.x.size()));
    } else {
      stream_as<float>(r, h, [&](const auto* p, std::size_t k, std::size_t off) {
        for (std::size_t i = 0; i < k; ++i) out[off + i] = static_cast<float>(p[i]);
      });
    }
    const Index size = d.x.size();
#pragma omp parallel for reduction(&& : finite) schedule(static)
    for (Index i = 0; i < size; ++i) finite = finite && std::isfinite(out[i]);
    DFM_CHECK(finite, r.what(), ": contains NaN or infinite values");
  }
  {
    const NpyHeader h = r.open("y");
    DFM_CHECK(h.shape.size() == 1 || h.shape.size() == 2, r.what(), ": shape ", shape_text(h.shape),
              ", expected [N] (classes) or [N, T] (multi-label)");
    DFM_CHECK(h.shape[0] == d.n, r.what(), ": ", h.shape[0], " rows, expected one per row of x (", d.n, ")");
    NodeTargets& t = d.targets;
    if (h.shape.size() == 1) {
      DFM_CHECK(h.descr == "<i8" || h.descr == "<i4", r.what(), ": dtype ", h.descr,
                ", expected int64 class labels (float [N] targets are regression, which train-large does not do)");
      t.y.resize(static_cast<size_t>(d.n));
      stream_as<std::int64_t>(r, h, [&](const auto* p, std::size_t k, std::size_t off) {
        for (std::size_t i = 0; i < k; ++i) t.y[off + i] = static_cast<std::int64_t>(p[i]) < 0 ? -1 : p[i];
      });
      const auto hi = *std::max_element(t.y.begin(), t.y.end());
      DFM_CHECK(hi >= 0, r.what(), ": no labelled node (every label is negative)");
      t.classes = std::max<std::int64_t>(hi + 1, 2);
    } else {
      t.multilabel = true;
      t.ym.resize(d.n, h.shape[1]);
      float* out = t.ym.data();
      stream_as<float>(r, h, [&](const auto* p, std::size_t k, std::size_t off) {
        for (std::size_t i = 0; i < k; ++i) {
          const float v = static_cast<float>(p[i]);
          DFM_CHECK(std::isnan(v) || v == 0.0f || v == 1.0f, r.what(), ": multi-label targets must be 0, 1 or NaN; ",
                    "found ", v, " at row ", (off + i) / h.shape[1]);
          out[off + i] = v;
        }
      });
      t.classes = 0;
    }
  }
  std::vector<std::int32_t> src, dst;
  std::vector<float> weight;
  if (r.has("edge_index")) {
    const NpyHeader h = r.open("edge_index");
    DFM_CHECK(h.descr == "<i8" || h.descr == "<i4", r.what(), ": dtype ", h.descr, ", expected int64");
    DFM_CHECK(h.shape.size() == 2 && h.shape[0] == 2, r.what(), ": shape ", shape_text(h.shape), ", expected [2, E]");
    const size_t e = static_cast<size_t>(h.shape[1]);
    src.resize(e);
    dst.resize(e);
    const Index n = d.n;
    stream_as<std::int64_t>(r, h, [&](const auto* p, std::size_t k, std::size_t off) {
      for (std::size_t i = 0; i < k; ++i) {
        const auto v = static_cast<std::int64_t>(p[i]);
        const size_t pos = off + i;
        DFM_CHECK(v >= 0 && v < n, r.what(), ": column ", pos % e, " has node ", v, " out of range for ", n, " nodes");
        (pos < e ? src[pos] : dst[pos - e]) = static_cast<std::int32_t>(v);
      }
    });
    if (r.has("edge_weight")) {
      const NpyHeader hw = r.open("edge_weight");
      DFM_CHECK(hw.shape.size() == 1 && static_cast<size_t>(hw.shape[0]) == e, r.what(), ": shape ",
                shape_text(hw.shape), ", expected [", e, "] (one per edge)");
      weight.resize(e);
      stream_as<float>(r, hw, [&](const auto* p, std::size_t k, std::size_t off) {
        for (std::size_t i = 0; i < k; ++i) {
          weight[off + i] = static_cast<float>(p[i]);
          DFM_CHECK(std::isfinite(weight[off + i]), r.what(), ": NaN or inf at ", off + i);
        }
      });
    }
  }
  d.graph = build_node_graph(d.n, src, dst, weight, prep, path + ": edge_index");
  if (r.has("train_idx") && r.has("val_idx") && r.has("test_idx")) {
    std::vector<Index> st, sv, ss;
    auto tr = read_index_array(r, "train_idx", d.n, &st);
    auto va = read_index_array(r, "val_idx", d.n, &sv);
    auto te = read_index_array(r, "test_idx", d.n, &ss);
    const Index runs = st.size() == 2 ? st[0] : 1;
    DFM_CHECK(sv.size() == st.size() && ss.size() == st.size() && (st.size() == 1 || (sv[0] == runs && ss[0] == runs)),
              path, ": train_idx, val_idx and test_idx must all be 1-D or all [runs, n] with the same runs");
    for (Index run = 0; run < runs; ++run) {
      auto row = [&](const std::vector<std::int64_t>& a, const std::vector<Index>& sh) {
        if (sh.size() == 1) return a;
        return std::vector<std::int64_t>(a.begin() + run * sh[1], a.begin() + (run + 1) * sh[1]);
      };
      Split s{row(tr, st), row(va, sv), row(te, ss)};
      validate_split(s, d.n, path + " (train_idx/val_idx/test_idx)");
      d.file_splits.push_back(std::move(s));
    }
    d.file_split_name = "file";
  }
  return d;
}

// ---- OGB raw layout ------------------------------------------------------------------------------
LargeDataset load_ogb_dir(const std::string& dir, const GraphPrep& prep, const std::string& split_name) {
  const fs::path root(dir), raw = root / "raw";
  std::error_code ec;
  DFM_CHECK(fs::is_directory(raw, ec), "cannot read OGB directory '", dir, "': no raw/ subdirectory");
  LargeDataset d;
  d.path = dir;
  Index n = -1;
  std::vector<std::int64_t> fi;
  std::vector<double> ff;
  std::string_view line;
  if (auto p = find_csv(raw, "num-node-list", false); !p.empty()) {
    GzLines in(p);
    DFM_CHECK(in.next(line), p, ": empty");
    parse_fields(line, fi, in);
    DFM_CHECK(fi.size() == 1 && fi[0] > 0, p, ": expected one positive node count");
    n = fi[0];
    DFM_CHECK(!in.next(line), p, ": several graphs; only single-graph (node property) datasets are supported");
  }
  // Edges.
  std::vector<std::int32_t> src, dst;
  {
    const std::string p = find_csv(raw, "edge", true);
    GzLines in(p);
    while (in.next(line)) {
      parse_fields(line, fi, in);
      DFM_CHECK(fi.size() == 2, p, ":", in.line_no(), ": expected 'source,target'");
      DFM_CHECK(fi[0] >= 0 && fi[1] >= 0 && fi[0] <= std::numeric_limits<std::int32_t>::max() &&
                    fi[1] <= std::numeric_limits<std::int32_t>::max() && (n < 0 || (fi[0] < n && fi[1] < n)),
                p, ":", in.line_no(), ": node id out of range", n >= 0 ? " [0, " + std::to_string(n) + ")" : "");
      src.push_back(static_cast<std::int32_t>(fi[0]));
      dst.push_back(static_cast<std::int32_t>(fi[1]));
    }
  }
  // Node features.
  const std::string feat_path = find_csv(raw, "node-feat", false);
  std::vector<float> feat;
  Index feat_rows = 0;
  if (!feat_path.empty()) {
    GzLines in(feat_path);
    while (in.next(line)) {
      parse_fields(line, ff, in);
      if (feat_rows == 0) d.features = static_cast<Index>(ff.size());
      DFM_CHECK(static_cast<Index>(ff.size()) == d.features, feat_path, ":", in.line_no(), ": ", ff.size(),
                " values, expected ", d.features, " like the first line");
      if (feat.empty() && n > 0) feat.reserve(static_cast<size_t>(n * d.features));
      for (double v : ff) feat.push_back(static_cast<float>(v));
      ++feat_rows;
    }
  }
  // Labels.
  const std::string label_path = find_csv(raw, "node-label", true);
  std::vector<float> lab;
  Index tasks = 0, label_rows = 0;
  {
    GzLines in(label_path);
    while (in.next(line)) {
      parse_fields(line, ff, in);
      if (label_rows == 0) tasks = static_cast<Index>(ff.size());
      DFM_CHECK(static_cast<Index>(ff.size()) == tasks, label_path, ":", in.line_no(), ": ", ff.size(),
                " values, expected ", tasks);
      for (double v : ff) lab.push_back(static_cast<float>(v));
      ++label_rows;
    }
  }
  if (n < 0) {
    n = label_rows;
    for (size_t e = 0; e < src.size(); ++e) n = std::max<Index>(n, std::max(src[e], dst[e]) + 1);
  }
  d.n = n;
  check_graph_ids(n, src, dir + " raw/edge");
  check_graph_ids(n, dst, dir + " raw/edge");
  DFM_CHECK(label_rows == n, label_path, ": ", label_rows, " rows, expected one per node (", n, ")");
  NodeTargets& t = d.targets;
  if (tasks == 1) {  // one column: class labels (NaN = unlabeled)
    t.y.resize(static_cast<size_t>(n));
    for (Index i = 0; i < n; ++i) {
      const float v = lab[i];
      DFM_CHECK(std::isnan(v) || v == std::floor(v), label_path, ": row ", i + 1, ": class label ", v, " is not an integer");
      t.y[i] = std::isnan(v) || v < 0 ? -1 : static_cast<std::int64_t>(v);
    }
    t.classes = std::max<std::int64_t>(*std::max_element(t.y.begin(), t.y.end()) + 1, 2);
  } else {
    t.multilabel = true;
    t.ym = Eigen::Map<Mat>(lab.data(), n, tasks);
    for (float v : lab)
      DFM_CHECK(std::isnan(v) || v == 0.0f || v == 1.0f, label_path, ": multi-label values must be 0, 1 or nan (found ",
                v, ")");
  }
  lab = {};
  if (!feat_path.empty()) {
    DFM_CHECK(feat_rows == n, feat_path, ": ", feat_rows, " rows, expected one per node (", n, ")");
    d.x = Eigen::Map<Mat>(feat.data(), n, d.features);
    feat = {};
  } else {
    // ogbn-proteins: node features = mean of the features of the node's incoming edges.
    const std::string p = find_csv(raw, "edge-feat", false);
    DFM_CHECK(!p.empty(), dir, ": raw/ has neither node-feat.csv.gz nor edge-feat.csv.gz to build node features from");
    GzLines in(p);
    MatD sum;
    std::vector<Index> count(static_cast<size_t>(n), 0);
    size_t e = 0;
    while (in.next(line)) {
      parse_fields(line, ff, in);
      if (e == 0) {
        d.features = static_cast<Index>(ff.size());
        sum = MatD::Zero(n, d.features);
      }
      DFM_CHECK(static_cast<Index>(ff.size()) == d.features, p, ":", in.line_no(), ": ", ff.size(), " values, expected ",
                d.features);
      DFM_CHECK(e < dst.size(), p, ": more rows than edges in raw/edge (", dst.size(), ")");
      const Index i = dst[e];
      for (Index f = 0; f < d.features; ++f) sum(i, f) += ff[f];
      ++count[i];
      ++e;
    }
    DFM_CHECK(e == dst.size(), p, ": ", e, " rows, expected one per edge (", dst.size(), ")");
    d.x.resize(n, d.features);
    for (Index i = 0; i < n; ++i) {
      if (count[i])
        d.x.row(i) = (sum.row(i) / static_cast<double>(count[i])).cast<float>();
      else
        d.x.row(i).setZero();
    }
  }
  DFM_CHECK(d.x.allFinite(), dir, ": node features contain NaN or inf");
  d.graph = build_node_graph(n, src, dst, {}, prep, dir + " raw/edge");
  src = {};
  dst = {};
  // Split.
  const fs::path split_root = root / "split";
  std::string name = split_name;
  if (name.empty() && fs::is_directory(split_root, ec)) {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(split_root))
      if (entry.is_directory()) names.push_back(entry.path().filename().string());
    DFM_CHECK(names.size() <= 1, dir, ": several splits under split/ (", names.size(), "); choose one with --split ogb:<name>");
    if (names.size() == 1) name = names[0];
  }
  if (!name.empty()) {
    const fs::path sd = split_root / name;
    DFM_CHECK(fs::is_directory(sd, ec), dir, ": no split directory split/", name);
    Split s;
    s.train = read_index_csv(find_csv(sd, "train", true), n);
    s.val = read_index_csv(find_csv(sd, "valid", true), n);
    s.test = read_index_csv(find_csv(sd, "test", true), n);
    validate_split(s, n, (sd).string());
    d.file_splits.push_back(std::move(s));
    d.file_split_name = "ogb:" + name;
  }
  return d;
}

LargeDataset load_large_dataset(const std::string& path, const GraphPrep& prep, const std::string& ogb_split) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return load_ogb_dir(path, prep, ogb_split);
  return load_large_npz(path, prep);
}

// ---- streaming .npz writing ------------------------------------------------------------------
namespace {
std::string npy_header(const std::string& descr, const std::vector<Index>& shape) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) dict += std::to_string(shape[i]) + (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
  dict += "), }";
  // magic(6) + version(2) + length(2) + dict + padding + '\n', a multiple of 64 bytes
  const size_t total = (10 + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - 10 - dict.size() - 1, ' ');
  dict += '\n';
  DFM_CHECK(dict.size() < 65536, "npy header too long");
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>(dict.size() >> 8);
  return out + dict;
}
}  // namespace

void write_npz_streaming(const std::string& path, const std::vector<NpzOutArray>& arrays, bool compress) {
  DFM_CHECK(!arrays.empty(), "cannot write '", path, "': no arrays");
  const std::string tmp = path + ".tmp";
  struct Guard {
    std::string p;
    bool armed = true;
    ~Guard() {
      if (armed) {
        std::error_code ec;
        fs::remove(p, ec);
      }
    }
  } guard{tmp};
  int err = 0;
  std::unique_ptr<zip_t, ZipDiscard> za(zip_open(tmp.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &err));
  DFM_CHECK(za, "cannot write '", path, "': cannot create '", tmp, "' (libzip error ", err, ")");
  std::vector<std::string> headers;
  headers.reserve(arrays.size());
  for (const auto& a : arrays) {
    std::size_t expect = 1;
    for (auto s : a.shape) expect *= static_cast<std::size_t>(s);
    std::size_t item = static_cast<std::size_t>(std::stoul(a.descr.substr(2)));
    std::size_t have = 0;
    for (auto& f : a.fragments) have += f.second;
    DFM_CHECK(have == expect * item, "write '", path, "': array ", a.name, " has ", have, " bytes, shape ",
              shape_text(a.shape), " needs ", expect * item);
    headers.push_back(npy_header(a.descr, a.shape));
    std::vector<zip_buffer_fragment_t> frags;
    frags.push_back({reinterpret_cast<zip_uint8_t*>(headers.back().data()), headers.back().size()});
    for (auto& f : a.fragments)
      if (f.second) frags.push_back({static_cast<zip_uint8_t*>(const_cast<void*>(f.first)), f.second});
    zip_source_t* s = zip_source_buffer_fragment(za.get(), frags.data(), frags.size(), 0);
    DFM_CHECK(s, "cannot write '", path, "': ", zip_strerror(za.get()));
    const zip_int64_t idx = zip_file_add(za.get(), (a.name + ".npy").c_str(), s, ZIP_FL_ENC_UTF_8);
    if (idx < 0) {
      zip_source_free(s);
      fail("cannot write '", path, "': cannot add ", a.name, ": ", zip_strerror(za.get()));
    }
    zip_set_file_compression(za.get(), static_cast<zip_uint64_t>(idx), compress ? ZIP_CM_DEFLATE : ZIP_CM_STORE, 0);
  }
  if (zip_close(za.get()) != 0) fail("cannot write '", path, "': ", zip_strerror(za.get()));
  za.release();
  std::error_code rec;
  fs::rename(tmp, path, rec);
  DFM_CHECK(!rec, "cannot write '", path, "': rename from '", tmp, "' failed: ", rec.message());
  guard.armed = false;
}

}  // namespace dfm
