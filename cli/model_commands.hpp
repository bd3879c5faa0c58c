// `difformer eval` and `difformer embed`: use a saved checkpoint on a dataset.
#pragma once
#include <string>

namespace CLI {
class App;
}

namespace dfm::cli {

struct ModelUseFlags {
  std::string model, data, out, splits_file, json_out, split = "public";
  int run = 0, threads = 0;
  bool logits = false;
};

void add_eval_command(CLI::App& app, ModelUseFlags& f);   // registers "eval"
void add_embed_command(CLI::App& app, ModelUseFlags& f);  // registers "embed"
int run_eval(const ModelUseFlags& f);
int run_embed(const ModelUseFlags& f);

}  // namespace dfm::cli
