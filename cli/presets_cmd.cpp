// `difformer presets`: the --preset rows of `difformer train`, as a table or JSON.
#include <cstdio>

#include "cli/commands.hpp"
#include "train/presets.hpp"

namespace dfm::cli {

int run_presets(bool as_json) {
  if (as_json) {
    json all = json::array();
    for (const Preset& p : presets()) {
      json settings = json::object();
      for (const auto& s : p.settings) settings[s.flag] = s.value;
      all.push_back(json{{"name", p.name},
                         {"task", p.task},
                         {"data_file", p.data_file},
                         {"summary", p.summary},
                         {"metric", p.metric},
                         {"published", p.published},
                         {"notes", p.notes},
                         {"settings", settings}});
    }
    std::printf("%s\n", all.dump(2).c_str());
    return 0;
  }
  std::printf("`difformer train --preset NAME [flags]`: the preset sets every option below that you do not pass;\n"
              "its data file is read from --data-dir (default ./data) unless you give --data.\n\n");
  for (const Preset& p : presets()) {
    std::printf("%-22s %s\n", p.name.c_str(), p.summary.c_str());
    std::printf("%-22s data %s, task %s, metric %s%s%s\n", "", p.data_file.c_str(), p.task.c_str(), p.metric.c_str(),
                p.published.empty() ? "" : ", published ", p.published.c_str());
    std::string flags;
    for (const auto& s : p.settings) flags += " " + s.flag + (s.value == "true" ? "" : " " + s.value);
    std::printf("%-22s%s\n", "", flags.c_str());
    if (!p.notes.empty()) std::printf("%-22s (%s)\n", "", p.notes.c_str());
    std::printf("\n");
  }
  return 0;
}

}  // namespace dfm::cli
