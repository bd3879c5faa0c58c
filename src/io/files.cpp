#include "io/files.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/error.hpp"

namespace dfm {

void write_text_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DFM_CHECK(f.good(), "cannot write '", path, "': cannot open '", tmp, "' for writing (does the directory exist?)");
    f << content;
    f.flush();
    if (!f.good()) {
      std::remove(tmp.c_str());
      fail("cannot write '", path, "': write failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    fail("cannot write '", path, "': ", ec.message());
  }
}

}  // namespace dfm
