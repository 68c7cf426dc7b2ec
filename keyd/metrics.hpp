// colcrypt-keyd's metrics in the Prometheus text format (version 0.0.4):
// the building blocks (a latency histogram, a writer that puts HELP and TYPE
// before every family and escapes label values) and the counters the poll
// loop keeps. What is measured where is listed in docs/operations.md,
// "Metrics". Metrics carry key names, never key bytes.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace colcrypt::keyd {

// Upper bounds (seconds) of the latency buckets: 100 µs to 2.5 s.
constexpr std::array<double, 14> kLatencyBuckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5};

// A cumulative histogram of durations in seconds over kLatencyBuckets.
struct LatencyHistogram {
  std::array<uint64_t, kLatencyBuckets.size()> buckets{};  // observations <= bound (not cumulative)
  uint64_t count = 0;
  double sum = 0;
  void observe(double seconds);
};

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Builds the exposition text. Every family starts with family(); its samples
// follow before the next family starts.
class MetricsText {
 public:
  // type: "counter", "gauge" or "histogram".
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const MetricLabels& labels, double value);
  // The _bucket (with le, +Inf last), _sum and _count lines of a histogram family.
  void histogram(std::string_view name, const MetricLabels& labels, const LatencyHistogram& h);
  const std::string& text() const { return out_; }

 private:
  std::string out_;
};

// "\\", "\"" and newlines escaped, as label values need.
std::string escape_label_value(std::string_view value);

// Counters of the poll loop's thread (not thread-safe: the loop alone
// updates and reads them).
struct LoopMetrics {
  std::map<std::string, uint64_t> fetches;  // key name -> key replies sent
  // (key name, reason) -> denials; reason "peer" (uid not on --allow-uid) or
  // "sql" (the extension denied a database role, a DenialReport).
  std::map<std::pair<std::string, std::string>, uint64_t> denials;
  uint64_t refused_peers = 0;      // connections refused at accept (uid on neither list)
  LatencyHistogram fetch_latency;  // request read -> key reply fully written
};

// The label value for a key name a peer sent that names no key of the store:
// one series for all of them (a peer cannot make keyd grow a series per name).
constexpr const char* kUnknownKeyLabel = "(unknown)";

}  // namespace colcrypt::keyd
