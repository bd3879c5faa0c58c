// Tests of the .npy/.npz reader and writer (src/data/npz.*): round trips for every dtype,
// the real Cora file and a golden fixture (values checked against numpy), and malformed inputs.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zip.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>

#include "core/error.hpp"
#include "data/npz.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace dfm;

namespace {

const std::string kSrc = DIFFORMER_SOURCE_DIR;

// A fresh directory per test, removed afterwards.
class NpzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dfm_npz_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string file(const std::string& name) const { return (dir / name).string(); }
  fs::path dir;
};

using test::expect_error;

// A hand-made .npy image: magic, version, header length, the given header text, payload.
std::vector<std::uint8_t> make_npy(const std::string& header, const std::vector<std::uint8_t>& payload,
                                   int major = 1) {
  // Presized and memcpy'd: push_back/insert here trips a GCC 12 -Wstringop-overflow false positive.
  std::size_t len_bytes = major == 1 ? 2 : 4, prefix = 8 + len_bytes;
  std::vector<std::uint8_t> out(prefix + header.size() + payload.size());
  std::memcpy(out.data(), "\x93NUMPY", 6);
  out[6] = std::uint8_t(major);
  for (std::size_t k = 0; k < len_bytes; ++k) out[8 + k] = std::uint8_t(header.size() >> (8 * k));
  if (!header.empty()) std::memcpy(out.data() + prefix, header.data(), header.size());
  if (!payload.empty()) std::memcpy(out.data() + prefix + header.size(), payload.data(), payload.size());
  return out;
}

std::vector<std::uint8_t> f64_bytes(std::vector<double> v) {
  std::vector<std::uint8_t> b(v.size() * 8);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

NpyArray parse(const std::vector<std::uint8_t>& img, const std::string& what = "mem.npy") {
  return parse_npy(img.data(), img.size(), what);
}

void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A stored zip holding the given raw members, built with libzip directly so that the members
// can be malformed.
void make_zip(const std::string& path,
              const std::vector<std::pair<std::string, std::vector<std::uint8_t>>>& members) {
  int err = 0;
  zip_t* z = zip_open(path.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &err);
  ASSERT_NE(z, nullptr);
  for (const auto& [name, data] : members) {
    zip_source_t* s = zip_source_buffer(z, data.data(), data.size(), 0);
    ASSERT_NE(s, nullptr);
    ASSERT_GE(zip_file_add(z, name.c_str(), s, 0), 0);
  }
  ASSERT_EQ(zip_close(z), 0);
}

NpyArray raw_array(DType t, std::vector<Index> shape, std::vector<std::uint8_t> bytes,
                   Index char_width = 0) {
  NpyArray a;
  a.dtype = t;
  a.shape = std::move(shape);
  a.bytes = std::move(bytes);
  a.char_width = char_width;
  return a;
}

// UTF-32LE bytes of an ASCII string padded with NULs to `width` characters.
std::vector<std::uint8_t> utf32(const std::string& s, std::size_t width) {
  std::vector<std::uint8_t> b(width * 4, 0);
  for (std::size_t i = 0; i < s.size(); ++i) b[4 * i] = std::uint8_t(s[i]);
  return b;
}

// One array of every dtype and several ranks, including 0-d, 3-d and empty.
std::map<std::string, NpyArray> sample_arrays() {
  std::map<std::string, NpyArray> m;
  std::vector<float> f = {1.f, -2.5f, 3.25f, 1e-30f, 7.f, 8.f};
  m["f32_2d"] = NpyArray::from_f32({2, 3}, f.data());
  std::vector<double> d(24);
  for (int i = 0; i < 24; ++i) d[i] = i * 0.125 - 1.0 + 1e-12 * i;
  m["f64_3d"] = NpyArray::from_f64({2, 3, 4}, d.data());
  std::int64_t s = -1234567890123LL;
  m["i64_0d"] = NpyArray::from_i64({}, &s);
  std::vector<std::int64_t> iv = {5, -6, 7};
  m["i64_1d"] = NpyArray::from_i64({3}, iv.data());
  m["i32_1d"] = raw_array(DType::i32, {3}, {1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 2, 1, 0, 0});
  m["u8_1d"] = raw_array(DType::u8, {4}, {0, 1, 200, 255});
  m["b1_2d"] = raw_array(DType::b1, {2, 2}, {1, 0, 0, 1});
  m["u_0d"] = NpyArray::from_string("{\"kernel\": \"simple\"}");
  m["u_1d"] = raw_array(DType::unicode, {2}, [] {
    auto a = utf32("ab", 3), b = utf32("xyz", 3);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }(), 3);
  m["f32_empty"] = NpyArray::from_f32({0, 3}, nullptr);
  double one = 0.5;
  m["f64_0d"] = NpyArray::from_f64({}, &one);
  return m;
}

void expect_same(const NpyArray& got, const NpyArray& want, const std::string& name) {
  SCOPED_TRACE(name);
  EXPECT_EQ(got.dtype, want.dtype);
  EXPECT_EQ(got.shape, want.shape);
  EXPECT_EQ(got.char_width, want.char_width);
  EXPECT_EQ(got.bytes, want.bytes);
}

}  // namespace

// ---- round trips ----------------------------------------------------------------------------

TEST_F(NpzTest, RoundTripNpzCompressedAndStored) {
  auto arrays = sample_arrays();
  for (bool compress : {true, false}) {
    SCOPED_TRACE(compress ? "compressed" : "stored");
    std::string p = file(compress ? "c.npz" : "s.npz");
    write_npz(p, arrays, compress);
    EXPECT_FALSE(fs::exists(p + ".tmp"));
    Npz z = read_npz(p);
    EXPECT_EQ(z.path, p);
    ASSERT_EQ(z.arrays.size(), arrays.size());
    for (const auto& [name, a] : arrays) {
      ASSERT_TRUE(z.has(name)) << name;
      expect_same(z.at(name), a, name);
    }
    // The compress flag selects the zip method of every member.
    int err = 0;
    zip_t* zz = zip_open(p.c_str(), ZIP_RDONLY, &err);
    ASSERT_NE(zz, nullptr);
    ASSERT_EQ(zip_get_num_entries(zz, 0), static_cast<zip_int64_t>(arrays.size()));
    for (zip_int64_t k = 0; k < zip_get_num_entries(zz, 0); ++k) {
      zip_stat_t st;
      ASSERT_EQ(zip_stat_index(zz, static_cast<zip_uint64_t>(k), 0, &st), 0);
      EXPECT_EQ(st.comp_method, compress ? ZIP_CM_DEFLATE : ZIP_CM_STORE) << st.name;
      EXPECT_TRUE(std::string(st.name).ends_with(".npy")) << st.name;
    }
    zip_discard(zz);
  }
}

TEST_F(NpzTest, RoundTripNpyEveryDtype) {
  for (const auto& [name, a] : sample_arrays()) {
    std::string p = file(name + ".npy");
    write_npy(p, a);
    EXPECT_FALSE(fs::exists(p + ".tmp"));
    expect_same(read_npy(p), a, name);
  }
}

TEST_F(NpzTest, EmptyArchiveRoundTrip) {
  std::string p = file("empty.npz");
  write_npz(p, {});
  EXPECT_EQ(fs::file_size(p), 22u);  // an end-of-central-directory record only
  EXPECT_TRUE(read_npz(p).arrays.empty());
}

TEST_F(NpzTest, OverwriteReplacesFile) {
  std::string p = file("a.npz");
  double v = 1.0;
  write_npz(p, {{"a", NpyArray::from_f64({}, &v)}, {"b", NpyArray::from_f64({}, &v)}});
  v = 2.0;
  write_npz(p, {{"c", NpyArray::from_f64({1}, &v)}});
  Npz z = read_npz(p);
  ASSERT_EQ(z.arrays.size(), 1u);
  EXPECT_EQ(z.at("c").to_f64("c"), std::vector<double>{2.0});
}

TEST(Npy, HeaderLayoutMatchesNumpy) {
  std::vector<float> f(5, 1.f);
  auto img = npy_bytes(NpyArray::from_f32({5}, f.data()));
  ASSERT_GE(img.size(), 10u);
  EXPECT_EQ(std::memcmp(img.data(), "\x93NUMPY\x01\x00", 8), 0);
  std::size_t header_len = img[8] | (img[9] << 8);
  EXPECT_EQ((10 + header_len) % 64, 0u);  // data aligned as numpy aligns it
  EXPECT_EQ(img.size(), 10 + header_len + 20);
  std::string header(img.begin() + 10, img.begin() + 10 + static_cast<long>(header_len));
  EXPECT_EQ(header.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", 0), 0u);
  EXPECT_EQ(header.back(), '\n');
}

// ---- accessors ------------------------------------------------------------------------------

TEST(Npy, ShapeAccessors) {
  auto m = sample_arrays();
  EXPECT_EQ(m["f64_3d"].numel(), 24);
  EXPECT_EQ(m["f64_3d"].dim(2), 4);
  EXPECT_EQ(m["i64_0d"].numel(), 1);
  EXPECT_EQ(m["f32_empty"].numel(), 0);
  EXPECT_EQ(m["u_1d"].itemsize(), 12u);
  EXPECT_EQ(m["u_1d"].descr(), "<U3");
  EXPECT_EQ(m["b1_2d"].descr(), "|b1");
  expect_error([&] { m["f64_3d"].dim(3); }, {"dimension 3 out of range", "(2, 3, 4)"});
  expect_error([&] { m["i64_0d"].dim(0); }, {"out of range", "()"});
}

TEST(Npy, NumericConversions) {
  auto m = sample_arrays();
  EXPECT_EQ(m["f32_2d"].to_f32("a"), (std::vector<float>{1.f, -2.5f, 3.25f, 1e-30f, 7.f, 8.f}));
  EXPECT_EQ(m["f32_2d"].to_f64("a")[1], -2.5);
  EXPECT_EQ(m["f64_3d"].to_f64("a")[23], 23 * 0.125 - 1.0 + 23e-12);
  EXPECT_FLOAT_EQ(m["f64_3d"].to_f32("a")[5], float(5 * 0.125 - 1.0 + 5e-12));
  EXPECT_EQ(m["i32_1d"].to_i64("a"), (std::vector<std::int64_t>{1, -1, 258}));
  EXPECT_EQ(m["i32_1d"].to_f32("a"), (std::vector<float>{1.f, -1.f, 258.f}));
  EXPECT_EQ(m["i64_0d"].to_i64("a"), std::vector<std::int64_t>{-1234567890123LL});
  EXPECT_EQ(m["i64_1d"].to_f64("a"), (std::vector<double>{5, -6, 7}));
  EXPECT_EQ(m["u8_1d"].to_i64("a"), (std::vector<std::int64_t>{0, 1, 200, 255}));
  EXPECT_EQ(m["b1_2d"].to_i64("a"), (std::vector<std::int64_t>{1, 0, 0, 1}));
  EXPECT_EQ(m["b1_2d"].to_f32("a"), (std::vector<float>{1, 0, 0, 1}));

  expect_error([&] { m["f32_2d"].to_i64("cora.npz:x"); },
               {"cora.npz:x", "dtype <f4", "expected an integer dtype"});
  expect_error([&] { m["f64_3d"].to_i64("f"); }, {"dtype <f8"});
  expect_error([&] { m["u_0d"].to_f32("cfg"); }, {"cfg", "<U", "expected a numeric dtype"});
  expect_error([&] { m["u_0d"].to_i64("cfg"); }, {"cfg", "expected an integer dtype"});
}

TEST(Npy, MatrixConversions) {
  auto m = sample_arrays();
  Mat a = m["f32_2d"].to_mat("a");
  ASSERT_EQ(a.rows(), 2);
  ASSERT_EQ(a.cols(), 3);
  EXPECT_EQ(a(0, 1), -2.5f);
  EXPECT_EQ(a(1, 0), 1e-30f);  // row-major: element 3 is row 1, column 0
  MatD v = m["i64_1d"].to_matd("v");
  ASSERT_EQ(v.rows(), 3);
  ASSERT_EQ(v.cols(), 1);
  EXPECT_EQ(v(1, 0), -6.0);
  Mat e = m["f32_empty"].to_mat("e");
  EXPECT_EQ(e.rows(), 0);
  EXPECT_EQ(e.cols(), 3);
  expect_error([&] { m["f64_3d"].to_mat("q"); }, {"q", "expected a 1-D or 2-D array", "(2, 3, 4)"});
  expect_error([&] { m["f64_0d"].to_matd("s"); }, {"s", "1-D or 2-D", "()"});
  expect_error([&] { m["u_1d"].to_mat("u"); }, {"u", "numeric"});
}

TEST(Npy, Strings) {
  auto m = sample_arrays();
  EXPECT_EQ(m["u_0d"].to_string("c"), "{\"kernel\": \"simple\"}");
  EXPECT_EQ(m["u_0d"].descr(), "<U20");
  // Shorter strings are NUL-padded to the field width; the padding is not part of the value.
  EXPECT_EQ(raw_array(DType::unicode, {}, utf32("ab", 5), 5).to_string("p"), "ab");
  // Non-ASCII text survives UTF-8 -> UTF-32 -> UTF-8.
  std::string text = "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9D\x84\x9E";  // "héllo € 𝄞"
  NpyArray u = NpyArray::from_string(text);
  EXPECT_EQ(u.char_width, 9);
  EXPECT_EQ(u.to_string("u"), text);
  EXPECT_EQ(NpyArray::from_string("").descr(), "<U1");
  EXPECT_EQ(NpyArray::from_string("").to_string("e"), "");
  expect_error([&] { m["u_1d"].to_string("names"); }, {"names", "expected a 0-d string array", "(2,)"});
  expect_error([&] { m["f64_0d"].to_string("loss"); }, {"loss", "dtype <f8", "expected a string"});
  expect_error([] { NpyArray::from_string("bad \xC3"); }, {"invalid UTF-8"});
}

// ---- real data ------------------------------------------------------------------------------

TEST(NpzData, Cora) {
  const std::string p = kSrc + "/data/cora.npz";
  Npz z = read_npz(p);
  ASSERT_EQ(z.arrays.size(), 6u);
  const NpyArray& x = z.at("x");
  EXPECT_EQ(x.dtype, DType::f32);
  EXPECT_EQ(x.shape, (std::vector<Index>{2708, 1433}));
  Mat xm = x.to_mat(p + ":x");
  ASSERT_EQ(xm.rows(), 2708);
  ASSERT_EQ(xm.cols(), 1433);
  // Reference values from numpy: x.sum() == 49216, x[0].sum() == 9, x[:, 0].sum() == 16,
  // np.nonzero(x[0])[0][:2] == [19, 81].
  EXPECT_EQ(xm.cast<double>().sum(), 49216.0);
  EXPECT_EQ(xm.row(0).sum(), 9.f);
  EXPECT_EQ(xm.col(0).sum(), 16.f);
  EXPECT_EQ(xm(0, 19), 1.f);
  EXPECT_EQ(xm(0, 18), 0.f);
  EXPECT_EQ(xm(0, 81), 1.f);

  const NpyArray& y = z.at("y");
  EXPECT_EQ(y.dtype, DType::i64);
  EXPECT_EQ(y.shape, std::vector<Index>{2708});
  auto yv = y.to_i64(p + ":y");
  EXPECT_EQ(std::vector<std::int64_t>(yv.begin(), yv.begin() + 10),
            (std::vector<std::int64_t>{3, 4, 4, 0, 3, 2, 0, 3, 3, 2}));
  EXPECT_EQ(std::accumulate(yv.begin(), yv.end(), std::int64_t{0}), 7781);
  EXPECT_EQ(*std::max_element(yv.begin(), yv.end()), 6);

  const NpyArray& ei = z.at("edge_index");
  EXPECT_EQ(ei.dtype, DType::i64);
  EXPECT_EQ(ei.shape, (std::vector<Index>{2, 10556}));
  auto ev = ei.to_i64(p + ":edge_index");
  EXPECT_EQ(std::accumulate(ev.begin(), ev.end(), std::int64_t{0}), 27640436);
  EXPECT_EQ(ev[0], 0);
  EXPECT_EQ(ev[10556 + 0], 633);
  EXPECT_EQ(ev[3], 1);
  EXPECT_EQ(ev[10556 + 3], 2);
  EXPECT_EQ(ev[10556 - 1], 2707);
  EXPECT_EQ(ev[2 * 10556 - 1], 2706);

  // The standard Planetoid split: train 0..139, val 140..639, test 1708..2707.
  struct Split { const char* name; Index n; std::int64_t first, sum; };
  for (Split s : {Split{"train_idx", 140, 0, 9730}, Split{"val_idx", 500, 140, 194750},
                  Split{"test_idx", 1000, 1708, 2207500}}) {
    SCOPED_TRACE(s.name);
    const NpyArray& a = z.at(s.name);
    EXPECT_EQ(a.dtype, DType::i64);
    EXPECT_EQ(a.shape, std::vector<Index>{s.n});
    auto v = a.to_i64(s.name);
    EXPECT_EQ(v.front(), s.first);
    EXPECT_EQ(std::accumulate(v.begin(), v.end(), std::int64_t{0}), s.sum);
  }
}

TEST(NpzData, GoldenFixture) {
  const std::string p = kSrc + "/tests/fixtures/difformer_small_simple_graph.npz";
  Npz z = read_npz(p);
  EXPECT_EQ(z.arrays.size(), 98u);  // len(np.load(p).files)
  const NpyArray& x = z.at("x");
  EXPECT_EQ(x.dtype, DType::f64);
  EXPECT_EQ(x.shape, (std::vector<Index>{11, 6}));
  MatD xm = x.to_matd("x");
  // Reference values printed by numpy with repr().
  EXPECT_EQ(xm(0, 0), 1.0014258282993993);
  EXPECT_EQ(xm(10, 5), -1.2003566812819153);
  EXPECT_NEAR(xm.sum(), 0.7926436072813612, 1e-13);

  const NpyArray& loss = z.at("loss");
  EXPECT_TRUE(loss.shape.empty());
  EXPECT_EQ(loss.to_f64("loss"), std::vector<double>{1.05055746064404});

  EXPECT_EQ(z.at("y").to_i64("y"), (std::vector<std::int64_t>{2, 0, 0, 2, 0, 0, 1, 0, 1, 2, 0}));
  auto ei = z.at("edge_index").to_i64("edge_index");
  EXPECT_EQ(z.at("edge_index").shape, (std::vector<Index>{2, 30}));
  EXPECT_EQ((std::vector<std::int64_t>(ei.begin(), ei.begin() + 4)), (std::vector<std::int64_t>{0, 0, 0, 0}));
  EXPECT_EQ((std::vector<std::int64_t>(ei.begin() + 30, ei.begin() + 34)),
            (std::vector<std::int64_t>{1, 2, 5, 9}));

  const NpyArray& q = z.at("dbg__layer0__q");
  EXPECT_EQ(q.shape, (std::vector<Index>{11, 2, 8}));
  EXPECT_EQ(q.to_f64("q")[(3 * 2 + 1) * 8 + 5], -0.28165787784511215);  // q[3, 1, 5]

  EXPECT_EQ(z.at("cfg__num_heads").to_i64("h"), std::vector<std::int64_t>{2});
  const NpyArray& cfg = z.at("config_json");
  EXPECT_EQ(cfg.dtype, DType::unicode);
  EXPECT_EQ(cfg.descr(), "<U923");
  std::string json = cfg.to_string("config_json");
  EXPECT_EQ(json.size(), 923u);
  EXPECT_EQ(json.rfind("{\"in_channels\": 6, \"hidden_channels\": 8", 0), 0u);
  EXPECT_NE(json.find("\"kernel\": \"simple\""), std::string::npos);
  EXPECT_EQ(json.back(), '}');
}

// ---- headers numpy can write ----------------------------------------------------------------

TEST(Npy, HeaderVariants) {
  auto payload = f64_bytes({1.5, -2.0});
  // Versions 2.0 and 3.0 have a 4-byte header length.
  for (int major : {1, 2, 3}) {
    SCOPED_TRACE(major);
    NpyArray a = parse(make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }\n",
                                payload, major));
    EXPECT_EQ(a.dtype, DType::f64);
    EXPECT_EQ(a.shape, std::vector<Index>{2});
    EXPECT_EQ(a.to_f64("a"), (std::vector<double>{1.5, -2.0}));
  }
  // Other key order, double quotes, no trailing comma, Python 2 'L' suffix, '=' byte order.
  NpyArray b = parse(make_npy("{\"shape\": (1L, 2L), \"fortran_order\": False, \"descr\": \"=f8\"}",
                              payload));
  EXPECT_EQ(b.shape, (std::vector<Index>{1, 2}));
  EXPECT_EQ(b.dtype, DType::f64);
  // 0-d and one-byte types with '|' and '<'.
  EXPECT_TRUE(parse(make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (), }",
                             f64_bytes({3.0})))
                  .shape.empty());
  EXPECT_EQ(parse(make_npy("{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }", {1, 0, 1}))
                .dtype,
            DType::b1);
  EXPECT_EQ(parse(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", {7, 0, 0, 0}))
                .to_i64("i"),
            std::vector<std::int64_t>{7});
  NpyArray u = parse(make_npy("{'descr': '<U2', 'fortran_order': False, 'shape': (), }", utf32("hi", 2)));
  EXPECT_EQ(u.char_width, 2);
  EXPECT_EQ(u.to_string("u"), "hi");
}

// ---- malformed input ------------------------------------------------------------------------

TEST_F(NpzTest, MissingFile) {
  std::string p = file("nope.npz");
  expect_error([&] { read_npz(p); }, {"cannot open '" + p + "': No such file"});
  expect_error([&] { read_npy(file("nope.npy")); }, {"cannot open '" + file("nope.npy") + "': No such file"});
}

TEST_F(NpzTest, NotAZip) {
  std::string p = file("text.npz");
  write_bytes(p, std::vector<std::uint8_t>(100, 'x'));
  expect_error([&] { read_npz(p); }, {p, "not a zip archive"});
  // A lone .npy is not an .npz either.
  std::string n = file("a.npy");
  double v = 1;
  write_npy(n, NpyArray::from_f64({}, &v));
  expect_error([&] { read_npz(n); }, {n, "not a zip archive"});
}

TEST_F(NpzTest, TruncatedArchive) {
  std::string p = file("cut.npz");
  std::vector<double> d(1000, 0.25);
  write_npz(p, {{"x", NpyArray::from_f64({1000}, d.data())}}, false);
  auto b = read_bytes(p);
  b.resize(b.size() / 2);  // loses the central directory
  write_bytes(p, b);
  expect_error([&] { read_npz(p); }, {p});
}

TEST(Npy, TruncatedOrOversizedPayload) {
  const std::string h = "{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }\n";
  expect_error([&] { parse(make_npy(h, f64_bytes({1, 2, 3})), "d.npz:x"); },
               {"d.npz:x", "payload is 24 bytes", "needs 32 bytes", "truncated"});
  expect_error([&] { parse(make_npy(h, f64_bytes({1, 2, 3, 4, 5})), "d.npz:x"); },
               {"d.npz:x", "payload is 40 bytes", "needs 32 bytes", "trailing data"});
}

TEST_F(NpzTest, TruncatedMemberNamesMember) {
  std::string p = file("bad.npz");
  auto good = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }\n", f64_bytes({1, 2}));
  auto bad = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }\n", f64_bytes({1, 2}));
  make_zip(p, {{"ok.npy", good}, {"x.npy", bad}});
  expect_error([&] { read_npz(p); }, {p + ":x", "payload is 16 bytes", "needs 48 bytes"});
}

TEST(Npy, BadMagicAndVersion) {
  std::vector<std::uint8_t> junk = {'P', 'K', 3, 4, 0, 0, 0, 0, 0, 0, 0, 0};
  expect_error([&] { parse(junk, "j.npy"); }, {"j.npy", "not a .npy file (bad magic"});
  expect_error([&] { parse({0x93, 'N', 'U'}, "short"); }, {"short", "bad magic"});
  auto v4 = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", f64_bytes({1}), 4);
  expect_error([&] { parse(v4, "v4"); }, {"v4", "unsupported .npy format version 4.0"});
  auto img = make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", {});
  img.resize(30);  // header length says more than there is
  expect_error([&] { parse(img, "h"); }, {"h", "header truncated"});
}

TEST(Npy, FortranOrder) {
  auto img = make_npy("{'descr': '<f8', 'fortran_order': True, 'shape': (2, 1), }", f64_bytes({1, 2}));
  expect_error([&] { parse(img, "f.npz:w"); }, {"f.npz:w", "fortran_order=True", "C order"});
}

TEST(Npy, UnsupportedDtype) {
  auto hdr = [](const std::string& descr) {
    return "{'descr': " + descr + ", 'fortran_order': False, 'shape': (1,), }";
  };
  std::vector<std::uint8_t> eight(8, 0);
  expect_error([&] { parse(make_npy(hdr("'|O'"), eight), "o.npz:obj"); },
               {"o.npz:obj", "unsupported dtype '|O'", "supported: <f4, <f8, <i4, <i8, |u1, |b1, <U<n>"});
  expect_error([&] { parse(make_npy(hdr("'>f8'"), eight), "be"); },
               {"be", "unsupported dtype '>f8'", "big-endian"});
  expect_error([&] { parse(make_npy(hdr("'<c16'"), eight), "c"); }, {"unsupported dtype '<c16'"});
  expect_error([&] { parse(make_npy(hdr("'<f2'"), eight), "h"); }, {"unsupported dtype '<f2'"});
  expect_error([&] { parse(make_npy(hdr("'|f8'"), eight), "p"); }, {"unsupported dtype '|f8'"});
  expect_error([&] { parse(make_npy(hdr("[('a', '<f8')]"), eight), "s"); },
               {"s", "unsupported dtype", "structured"});
}

TEST(Npy, BadShapeString) {
  auto with_shape = [](const std::string& shape) {
    return make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': " + shape + ", }", {});
  };
  for (std::string s : {"(3, x)", "[3]", "(-1,)", "(3 4)", "3", "(99999999999999999999,)"}) {
    SCOPED_TRACE(s);
    expect_error([&] { parse(with_shape(s), "bs.npy"); }, {"bs.npy", "bad shape"});
  }
  // Dimensions that parse but whose product overflows.
  expect_error([&] { parse(with_shape("(4294967296, 4294967296)"), "big"); }, {"big", "too large"});
}

TEST(Npy, MalformedHeader) {
  std::vector<std::uint8_t> eight(8, 0);
  expect_error([&] { parse(make_npy("{'descr': '<f8', 'shape': (1,), }", eight), "m"); },
               {"m", "lacks one of 'descr', 'fortran_order', 'shape'"});
  expect_error([&] { parse(make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': 1}", eight), "k"); },
               {"k", "malformed .npy header"});
  expect_error([&] { parse(make_npy("{'descr': '<f8', 'fortran_order': maybe, 'shape': (1,)}", eight), "b"); },
               {"b", "True or False"});
  expect_error([&] { parse(make_npy("not a dict", eight), "n"); }, {"n", "malformed .npy header"});
}

TEST_F(NpzTest, MissingMember) {
  std::string p = file("ab.npz");
  double v = 1;
  write_npz(p, {{"b", NpyArray::from_f64({}, &v)}, {"a", NpyArray::from_f64({}, &v)}});
  Npz z = read_npz(p);
  EXPECT_TRUE(z.has("a"));
  EXPECT_FALSE(z.has("nope"));
  expect_error([&] { z.at("nope"); }, {p + ": no array 'nope' (has: a, b)"});
}

// ---- writer errors --------------------------------------------------------------------------

TEST_F(NpzTest, WriteFailuresLeaveNothing) {
  double v = 1;
  std::string p = file("no_such_dir/out.npz");
  expect_error([&] { write_npz(p, {{"a", NpyArray::from_f64({}, &v)}}); }, {"cannot write '" + p + "'"});
  expect_error([&] { write_npy(file("no_such_dir/out.npy"), NpyArray::from_f64({}, &v)); },
               {"cannot write"});
  // Byte count disagreeing with the shape is refused before anything is written.
  std::string q = file("bad.npz");
  NpyArray bad = raw_array(DType::f64, {2}, {1, 2, 3});
  expect_error([&] { write_npz(q, {{"bad", bad}}); }, {"has 3 bytes, expected 16"});
  expect_error([&] { write_npy(file("bad.npy"), bad); }, {"has 3 bytes, expected 16"});
  EXPECT_TRUE(fs::is_empty(dir)) << "writers left files behind";
}
