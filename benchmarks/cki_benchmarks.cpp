// Throughput of information content, CKI splicing and the baseline merges,
// each against a memory copy of the bytes it reads and writes, in one binary.
//
// Every method benchmark reports the counter `ratio` = t_copy / t_method,
// where t_copy is the median time of a memcpy of (N + 1) x elements x 4 bytes
// between preallocated buffers, measured with the same thread count right
// before the method runs. Sizes and model counts are set with the options
// --cki_sizes=1,4,16 (millions of floats, 2^20 each), --cki_models=2,4,8 and
// --cki_threads=1,2; every Google Benchmark option (--benchmark_filter,
// --benchmark_repetitions, ...) works as usual.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cki/cki.hpp>

#include <cki/merge/registry.hpp>

#include "synthetic.hpp"

namespace {

constexpr std::int64_t kMebi = std::int64_t{1} << 20;

/// Options of this program that Google Benchmark does not parse.
struct Options {
  std::vector<int> sizes_mebi{1, 4, 16};
  std::vector<int> models{2, 4, 8};
  std::vector<int> threads{1, 2};
};

/// N synthetic models of one float tensor and room for the merged output,
/// stored back to back in one buffer, plus a second buffer of the same size
/// as the target of the reference copy.
struct Workload {
  int models = 0;
  std::int64_t elements = 0;
  cki::Shape shape;
  std::vector<float> arena;
  std::vector<float> copy_target;
  std::vector<float> fisher;  // per-model Fisher tensors, built by fisher_source()

  std::vector<cki::TensorView<float>> views() const {
    std::vector<cki::TensorView<float>> out;
    for (int k = 0; k < models; ++k) out.emplace_back(arena.data() + k * elements, shape);
    return out;
  }
  float* output() { return arena.data() + static_cast<std::int64_t>(models) * elements; }
  std::int64_t copy_bytes() const { return static_cast<std::int64_t>(arena.size() * sizeof(float)); }
};

using cki_bench::pseudo_normal;

/// Shape of a tensor of `elements` floats: a matrix as square as a power of
/// two allows, as in the weight matrices of a transformer layer.
cki::Shape matrix_shape(std::int64_t elements) {
  std::int64_t columns = 1;
  while (columns * columns * 4 <= elements && elements % (columns * 2) == 0) columns *= 2;
  return {elements / columns, columns};
}

/// Returns the workload of `models` models of `elements` floats, building it
/// when it differs from the last one requested. Only one workload is kept,
/// so benchmarks are registered grouped by size and model count.
Workload& workload(int models, std::int64_t elements) {
  static std::unique_ptr<Workload> cached;
  if (cached && cached->models == models && cached->elements == elements) return *cached;
  cached.reset();
  auto work = std::make_unique<Workload>();
  work->models = models;
  work->elements = elements;
  work->shape = matrix_shape(elements);
  work->arena.resize(static_cast<std::size_t>((models + 1) * elements));
  work->copy_target.resize(work->arena.size());

  // A shared base with standard deviation 0.02, and per-model deviations of
  // 0.005 from it: fine-tunes of one pretrained model.
  float* arena = work->arena.data();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < elements; ++i) {
    const float base = 0.02f * pseudo_normal(static_cast<std::uint64_t>(i));
    for (int k = 0; k < models; ++k) {
      const auto counter = static_cast<std::uint64_t>((k + 1) * elements + i);
      arena[k * elements + i] = base + 0.005f * pseudo_normal(counter);
    }
  }
  cached = std::move(work);
  return *cached;
}

/// Returns a FisherSource of synthetic diagonal Fisher tensors for the
/// models of `work`, positive values around 1e-3, built on first use.
cki::FisherSource<float> fisher_source(Workload& work) {
  const std::int64_t elements = work.elements;
  if (work.fisher.empty()) {
    work.fisher.resize(static_cast<std::size_t>(work.models * elements));
    float* fisher = work.fisher.data();
    const int models = work.models;
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < elements; ++i) {
      for (int k = 0; k < models; ++k) {
        const float value = pseudo_normal(static_cast<std::uint64_t>((models + 1 + k) * elements + i));
        fisher[k * elements + i] = 1e-3f * (0.5f + value * value);
      }
    }
  }
  const Workload* source = &work;
  return [source](const std::string& /*name*/) {
    cki::FisherTensors<float> tensors;
    for (int k = 0; k < source->models; ++k) {
      tensors.models.emplace_back(source->fisher.data() + k * source->elements, source->shape);
    }
    return tensors;
  };
}

/// Copies `bytes` from `source` to `target`, split into `threads` equal
/// contiguous parts that run in parallel.
void parallel_copy(void* target, const void* source, std::int64_t bytes, int threads) {
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int part = omp_get_thread_num();
      const int parts = omp_get_num_threads();
      const std::int64_t chunk = (bytes / parts + 63) / 64 * 64;
      const std::int64_t begin = std::min(bytes, part * chunk);
      const std::int64_t end = std::min(bytes, begin + chunk);
      std::memcpy(static_cast<char*>(target) + begin, static_cast<const char*>(source) + begin,
                  static_cast<std::size_t>(end - begin));
    }
    return;
  }
#endif
  (void)threads;
  std::memcpy(target, source, static_cast<std::size_t>(bytes));
}

/// Wall time and CPU time of the calling thread, in seconds.
struct Clock {
  double wall = 0.0;
  double cpu = 0.0;

  static Clock now() {
    timespec cpu_time{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu_time);
    const auto wall_time = std::chrono::steady_clock::now().time_since_epoch();
    return {std::chrono::duration<double>(wall_time).count(),
            static_cast<double>(cpu_time.tv_sec) + 1e-9 * static_cast<double>(cpu_time.tv_nsec)};
  }

  Clock since(const Clock& start) const { return {wall - start.wall, cpu - start.cpu}; }
};

/// Median wall and CPU times of five reference copies of the workload's
/// bytes, after one untimed copy.
Clock copy_time(Workload& work, int threads) {
  parallel_copy(work.copy_target.data(), work.arena.data(), work.copy_bytes(), threads);
  std::vector<double> wall, cpu;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const Clock start = Clock::now();
    parallel_copy(work.copy_target.data(), work.arena.data(), work.copy_bytes(), threads);
    benchmark::ClobberMemory();
    const Clock elapsed = Clock::now().since(start);
    wall.push_back(elapsed.wall);
    cpu.push_back(elapsed.cpu);
  }
  std::nth_element(wall.begin(), wall.begin() + 2, wall.end());
  std::nth_element(cpu.begin(), cpu.begin() + 2, cpu.end());
  return {wall[2], cpu[2]};
}

/// Runs `method` in the benchmark loop and reports its time as a ratio to
/// the reference copy of the same workload. `ratio` compares wall times. At
/// one thread, `ratio_cpu` compares the CPU times of the working thread,
/// which time slices lost to other processes on a shared machine do not
/// inflate.
void run_against_copy(benchmark::State& state, Workload& work, int threads, const std::function<void()>& method) {
  const Clock copy = copy_time(work, threads);
  Clock total;
  for (auto _ : state) {
    const Clock start = Clock::now();
    method();
    benchmark::ClobberMemory();
    const Clock elapsed = Clock::now().since(start);
    total.wall += elapsed.wall;
    total.cpu += elapsed.cpu;
  }
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["ratio"] = copy.wall / (total.wall / iterations);
  if (threads == 1) state.counters["ratio_cpu"] = copy.cpu / (total.cpu / iterations);
  state.counters["copy_ms"] = copy.wall * 1e3;
  state.SetBytesProcessed(state.iterations() * work.copy_bytes());
}

/// Runs the reference copy itself in the benchmark loop.
void run_copy(benchmark::State& state, Workload& work, int threads) {
  for (auto _ : state) {
    parallel_copy(work.copy_target.data(), work.arena.data(), work.copy_bytes(), threads);
    benchmark::ClobberMemory();
  }
  state.counters["ratio"] = 1.0;
  state.SetBytesProcessed(state.iterations() * work.copy_bytes());
}

/// Information content of every model, as CKI computes it once per tensor.
void run_information_content(benchmark::State& state, Workload& work, int threads) {
  const auto views = work.views();
  const cki::InformationContent information;
  std::vector<double> entropy(views.size());
  run_against_copy(state, work, threads, [&] {
    for (std::size_t k = 0; k < views.size(); ++k) entropy[k] = information(views[k], "bench", threads);
    benchmark::DoNotOptimize(entropy.data());
  });
}

/// One tensor merged by `policy` through splice_tensor(), the entry point of
/// splice() and of streamed merges.
template <typename Policy>
void run_policy(benchmark::State& state, Workload& work, int threads, const Policy& policy) {
  const auto views = work.views();
  float* out = work.output();
  run_against_copy(state, work, threads, [&] {
    const cki::TensorReport report = cki::splice_tensor("bench", views, 0, policy, out, threads);
    benchmark::DoNotOptimize(report);
    benchmark::DoNotOptimize(out);
  });
}

/// Times one stage of CKI's element loop on a block of kBlockElements
/// elements of N models that stays in cache, in ns of CPU time per element
/// (all N models): what the stage costs when memory is not the limit. The
/// stage "curves" computes the weights from fitted softmax curves, which
/// replace "local" and "rule" for float tensors without an assessment map,
/// chunk by chunk as splice() does for more than 8 models. The stages
/// "curves_soft" and "curves_hard" weigh and splice in one pass per vector
/// of elements, as splice() does for 2 to 8 models.
/// The stages "eigen_exp" and "eigen_logistic" time Eigen's vectorised exp
/// and logistic on one column, the functions the other stages are built from.
void run_block_stages(benchmark::State& state, int models, const std::string& stage) {
  const std::int64_t count = cki::detail::kBlockElements;
  std::vector<std::vector<float>> inputs(static_cast<std::size_t>(models), std::vector<float>(count));
  std::vector<const float*> pointers;
  for (int k = 0; k < models; ++k) {
    for (std::int64_t i = 0; i < count; ++i) {
      inputs[k][i] = 0.02f * pseudo_normal(static_cast<std::uint64_t>(k * count + i));
    }
    pointers.push_back(inputs[k].data());
  }
  cki::TensorContext context;
  context.name = "block";
  context.shape = {count};
  for (int k = 0; k < models; ++k) context.order.push_back(static_cast<std::size_t>(k));
  const cki::LocalUncertainty<float> local;
  const cki::CombinationRule rule;
  std::vector<float> global_weights(static_cast<std::size_t>(models), 1.0f / static_cast<float>(models));
  cki::BlockArray<float> l(count, models), w(count, models), scratch(count, std::max(models, 2));
  std::vector<float> out(static_cast<std::size_t>(count));
  std::vector<double> weight_sums(static_cast<std::size_t>(models));
  std::vector<std::int64_t> hard_counts(static_cast<std::size_t>(models));
  local(context, pointers.data(), count, l, scratch);
  rule(global_weights, count, l, w, scratch);
  Eigen::ArrayXf column = l.col(0);
  const std::vector<double> global_wide(global_weights.begin(), global_weights.end());
  const cki::detail::SoftmaxCurves curves = *cki::detail::SoftmaxCurves::fit(global_wide, 1.0, 1.0);
  cki::BlockArray<float> curve_scratch(cki::detail::SoftmaxCurves::kChunk, cki::detail::SoftmaxCurves::kScratchColumns);

  Clock total;
  for (auto _ : state) {
    const Clock start = Clock::now();
    if (stage == "local") {
      local(context, pointers.data(), count, l, scratch);
    } else if (stage == "rule") {
      rule(global_weights, count, l, w, scratch);
    } else if (stage == "soft") {
      cki::SoftSplice::apply(w, pointers.data(), count, models, out.data(), weight_sums.data(), hard_counts.data());
    } else if (stage == "hard") {
      cki::HardSplice::apply(w, pointers.data(), count, models, out.data(), weight_sums.data(), hard_counts.data());
    } else if (stage == "curves") {
      for (std::int64_t start = 0; start < count; start += cki::detail::SoftmaxCurves::kChunk) {
        std::vector<const float*> chunk(pointers);
        for (auto& pointer : chunk) pointer += start;
        benchmark::DoNotOptimize(curves.weights(chunk.data(), cki::detail::SoftmaxCurves::kChunk, w, curve_scratch));
      }
    } else if (stage == "curves_soft" || stage == "curves_hard") {
      const bool hard = stage == "curves_hard";
      cki::detail::SoftmaxCurves::with_model_count(models, [&](auto models_count) {
        constexpr int kN = decltype(models_count)::value;
        if (hard) {
          cki::HardSplice::apply_curves<kN>(curves, pointers.data(), count, out.data(), weight_sums.data(),
                                            hard_counts.data());
        } else {
          cki::SoftSplice::apply_curves<kN>(curves, pointers.data(), count, out.data(), weight_sums.data(),
                                            hard_counts.data());
        }
      });
    } else if (stage == "eigen_exp") {
      w.col(0) = (-column).exp();
    } else if (stage == "eigen_logistic") {
      w.col(0) = column.logistic();
    }
    benchmark::ClobberMemory();
    total.cpu += Clock::now().since(start).cpu;
  }
  const bool one_column = stage.rfind("eigen_", 0) == 0;
  state.counters["ns_per_element"] = total.cpu * 1e9 / static_cast<double>(state.iterations() * count);
  state.SetLabel(one_column ? "one column" : std::to_string(models) + " models");
}

cki::CkiParams rule_params(cki::RuleKind rule) {
  cki::CkiParams params;
  params.rule = rule;
  return params;
}

/// Registers one benchmark named "method/n:N/mfloats:S/threads:T".
void add(const std::string& method, int models, int size_mebi, int threads,
         std::function<void(benchmark::State&, Workload&, int)> body) {
  std::ostringstream name;
  name << method << "/n:" << models << "/mfloats:" << size_mebi << "/threads:" << threads;
  const std::int64_t elements = static_cast<std::int64_t>(size_mebi) * kMebi;
  benchmark::RegisterBenchmark(name.str().c_str(),
                               [=](benchmark::State& state) { body(state, workload(models, elements), threads); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

/// Registers every baseline merge method that takes `models` models.
/// Fisher merging also reads one synthetic Fisher tensor per model, N more
/// inputs than the copy it is compared with.
void add_baselines(int models, int size_mebi, int threads) {
  for (const std::string& method : cki::merge_method_names()) {
    if (method == "fisher") {
      add(method, models, size_mebi, threads, [](benchmark::State& state, Workload& work, int t) {
        const cki::FisherPolicy<float> policy(cki::FisherParams{}, fisher_source(work));
        run_policy(state, work, t, policy);
      });
      continue;
    }
    std::shared_ptr<cki::AnyPolicy<float>> policy;
    try {
      policy = std::make_shared<cki::AnyPolicy<float>>(cki::make_merge_policy<float>(method));
      policy->check(static_cast<std::size_t>(models));
    } catch (const std::invalid_argument&) {
      continue;  // e.g. slerp merges exactly two models
    }
    add(method, models, size_mebi, threads,
        [policy](benchmark::State& state, Workload& work, int t) { run_policy(state, work, t, *policy); });
  }
}

void register_all(const Options& options) {
  using cki::RuleKind;
  for (const char* stage : {"local", "rule", "soft", "hard", "curves", "curves_soft", "curves_hard", "eigen_exp",
                            "eigen_logistic"}) {
    const std::string name = std::string("block_stage/") + stage + "/n:4";
    benchmark::RegisterBenchmark(name.c_str(), [stage](benchmark::State& state) { run_block_stages(state, 4, stage); })
        ->Unit(benchmark::kMicrosecond);
  }
  for (int size : options.sizes_mebi) {
    for (int models : options.models) {
      for (int threads : options.threads) {
        add("copy", models, size, threads, run_copy);
        add("information_content", models, size, threads, run_information_content);
        add_baselines(models, size, threads);
        for (RuleKind rule : {RuleKind::softmax, RuleKind::blend, RuleKind::paired_softmax}) {
          if (rule != RuleKind::softmax && models != 2) continue;
          const std::string suffix = std::string("_") + cki::rule_name(rule);
          const cki::CkiSoft<float> soft(rule_params(rule));
          const cki::CkiHard<float> hard(rule_params(rule));
          add("cki_soft" + suffix, models, size, threads,
              [soft](benchmark::State& state, Workload& work, int t) { run_policy(state, work, t, soft); });
          add("cki_hard" + suffix, models, size, threads,
              [hard](benchmark::State& state, Workload& work, int t) { run_policy(state, work, t, hard); });
        }
      }
    }
  }
}

/// Parses "1,4,16" into integers; returns false on anything else.
bool parse_list(const std::string& text, std::vector<int>& out) {
  std::vector<int> values;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    char* end = nullptr;
    const long value = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || value < 1 || value > 4096) return false;
    values.push_back(static_cast<int>(value));
  }
  if (values.empty()) return false;
  out = values;
  return true;
}

/// Removes this program's options from argv; returns false and prints the
/// problem to stderr for an invalid value.
bool parse_options(int& argc, char** argv, Options& options) {
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string argument = argv[i];
    std::vector<int>* target = nullptr;
    std::string value;
    for (auto [prefix, list] : {std::pair<const char*, std::vector<int>*>{"--cki_sizes=", &options.sizes_mebi},
                                {"--cki_models=", &options.models},
                                {"--cki_threads=", &options.threads}}) {
      if (argument.rfind(prefix, 0) == 0) {
        target = list;
        value = argument.substr(std::strlen(prefix));
      }
    }
    if (target == nullptr) {
      argv[kept++] = argv[i];
      continue;
    }
    if (!parse_list(value, *target)) {
      std::cerr << "invalid option '" << argument << "': expected a comma-separated list of integers in [1, 4096]\n";
      return false;
    }
  }
  argc = kept;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse_options(argc, argv, options)) return 2;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
#if defined(__AVX512F__)
  benchmark::AddCustomContext("cki_vector_isa", "AVX-512");
#elif defined(__AVX2__)
  benchmark::AddCustomContext("cki_vector_isa", "AVX2");
#else
  benchmark::AddCustomContext("cki_vector_isa", "SSE2");
#endif
  register_all(options);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
