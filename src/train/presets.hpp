// Named training presets: one per row of SPEC.md's protocol tables (and the paper's w/o-graph
// rows), each a list of command-line settings of `difformer train`, so that a preset is exactly
// "these flags" and anything the user passes explicitly wins. Plus the per-task protocol
// defaults applied when a task is chosen without a preset.
//
// Sources, in order of authority: SPEC.md section 3 (every value it states); where it is silent
// (learning rates of the instance and temporal tasks, the instance hidden width, the temporal
// weight decay and dropout, the w/o-graph rows), the official DIFFormer run.sh scripts of
// qitianwu/DIFFormer ("image and text/run.sh", "spatial-temporal/run.sh"), which produced the
// published numbers; each such value is marked in presets.cpp.
#pragma once
#include <string>
#include <vector>

namespace dfm {

struct PresetSetting {
  std::string flag;   // a long option of `difformer train`, e.g. "--lr"
  std::string value;  // its value as typed on the command line ("true" for a bare flag)
};

struct Preset {
  std::string name;       // e.g. "cora-s"
  std::string task;       // node | instance | temporal
  std::string data_file;  // file name under the data directory, e.g. "cora.npz"
  std::string summary;    // one line: what the row is
  std::vector<PresetSetting> settings;
  std::string published;  // the paper's number for the row ("" when it has none)
  std::string metric;     // accuracy | mse
  std::string notes;      // where values SPEC does not state come from
};

const std::vector<Preset>& presets();
// nullptr when unknown.
const Preset* find_preset(const std::string& name);
// Names of all presets, comma-separated (for error messages).
std::string preset_names();
// The protocol defaults of a task (SPEC.md section 3), applied to options that neither the user
// nor a preset set. "node" has none: the built-in defaults are already Cora DIFFormer-s.
const std::vector<PresetSetting>& task_defaults(const std::string& task);

}  // namespace dfm
