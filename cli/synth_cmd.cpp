// `difformer synth`: a stochastic block model graph with class-dependent features, as .npz.
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli/large_commands.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "data/synth_sbm.hpp"
#include "io/files.hpp"

namespace dfm::cli {

int run_synth(const SynthFlags& f) {
  DFM_CHECK(!f.out.empty(), "--out is required");
  Context ctx(f.seed, f.threads);
  SbmOptions o;
  o.nodes = f.nodes;
  o.avg_degree = f.avg_degree;
  o.features = f.features;
  o.classes = f.classes;
  o.tasks = f.tasks;
  o.homophily = f.homophily;
  o.signal = f.signal;
  o.seed = f.seed;
  const auto t0 = std::chrono::steady_clock::now();
  const SbmGraph g = make_sbm(o);
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_sbm_npz(f.out, g, f.compress);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::error_code ec;
  const auto size = std::filesystem::file_size(f.out, ec);
  const double hom = g.edge_homophily();
  if (!f.quiet)
    std::printf("synth: %lld nodes, %lld directed edges (avg degree %.2f), %lld features, %lld %s, edge homophily %.3f; "
                "generated in %.1f s, written in %.1f s (%s, %.1f MB); peak RSS %.1f MB\n",
                (long long)f.nodes, (long long)g.edges(), static_cast<double>(g.edges()) / static_cast<double>(f.nodes),
                (long long)f.features, (long long)(f.tasks > 0 ? f.tasks : f.classes), f.tasks > 0 ? "tasks" : "classes",
                hom, gen_s, total_s - gen_s, f.out.c_str(), ec ? 0.0 : size / 1e6, peak_rss_bytes() / 1048576.0);
  if (!f.json_out.empty()) {
    json j{{"command", "synth"},   {"out", f.out},           {"nodes", f.nodes},
           {"edges", g.edges()},   {"features", f.features}, {"classes", f.classes},
           {"tasks", f.tasks},     {"homophily", f.homophily}, {"edge_homophily", hom},
           {"signal", f.signal},   {"seed", f.seed},         {"generate_seconds", gen_s},
           {"total_seconds", total_s}, {"file_bytes", ec ? 0 : size}, {"peak_rss_bytes", peak_rss_bytes()}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

CLI::App* add_synth_command(CLI::App& app, SynthFlags& s) {
  CLI::App* synth = app.add_subcommand("synth", "write a stochastic block model graph with class-dependent features (.npz)");
  synth->add_option("--nodes", s.nodes, "N")->required();
  synth->add_option("--avg-degree", s.avg_degree, "directed edges per node (N*K/2 pairs, both directions)")
      ->capture_default_str();
  synth->add_option("--features", s.features, "F")->capture_default_str();
  synth->add_option("--classes", s.classes, "C: blocks (= class labels without --tasks)")->capture_default_str();
  synth->add_option("--tasks", s.tasks, "T > 0: multi-label y [N, T] with block-dependent rates")->capture_default_str();
  synth->add_option("--homophily", s.homophily, "probability that an edge stays inside its block")->capture_default_str();
  synth->add_option("--signal", s.signal, "distance scale of the class feature means (noise is N(0, 1))")
      ->capture_default_str();
  synth->add_option("--seed", s.seed, "seed (the output depends on it alone, not on threads)")->capture_default_str();
  synth->add_option("--out", s.out, "output .npz (written to OUT.tmp, then renamed)")->required();
  synth->add_flag("--compress", s.compress, "deflate the members (slower; default stored, like numpy.savez)");
  synth->add_option("--threads", s.threads, "CPU threads (0: all)")->capture_default_str();
  synth->add_option("--json", s.json_out, "write a summary as JSON here");
  synth->add_flag("--quiet", s.quiet, "no summary line");
  return synth;
}

}  // namespace dfm::cli
