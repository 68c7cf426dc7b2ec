#include "keyd/metrics.hpp"

#include <cmath>
#include <cstdio>

namespace colcrypt::keyd {
namespace {

std::string format_value(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof buf, "%.0f", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.9g", v);
  }
  return buf;
}

void append_labels(std::string& out, const MetricLabels& labels) {
  if (labels.empty()) return;
  out += '{';
  bool first = true;
  for (const auto& [name, value] : labels) {
    if (!first) out += ',';
    first = false;
    out += name;
    out += "=\"";
    out += escape_label_value(value);
    out += '"';
  }
  out += '}';
}

}  // namespace

void LatencyHistogram::observe(double seconds) {
  if (!(seconds >= 0)) seconds = 0;  // a clock step never makes a negative latency
  ++count;
  sum += seconds;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    if (seconds <= kLatencyBuckets[i]) {
      ++buckets[i];
      return;
    }
  }
}

std::string escape_label_value(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void MetricsText::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  // HELP text escapes backslashes and newlines (not quotes).
  for (char c : help) {
    if (c == '\\') {
      out_ += "\\\\";
    } else if (c == '\n') {
      out_ += "\\n";
    } else {
      out_ += c;
    }
  }
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void MetricsText::sample(std::string_view name, const MetricLabels& labels, double value) {
  out_ += name;
  append_labels(out_, labels);
  out_ += ' ';
  out_ += format_value(value);
  out_ += '\n';
}

void MetricsText::histogram(std::string_view name, const MetricLabels& labels,
                            const LatencyHistogram& h) {
  const std::string base(name);
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= kLatencyBuckets.size(); ++i) {
    MetricLabels with_le = labels;
    if (i < kLatencyBuckets.size()) {
      cumulative += h.buckets[i];
      char le[32];
      std::snprintf(le, sizeof le, "%g", kLatencyBuckets[i]);
      with_le.emplace_back("le", le);
      sample(base + "_bucket", with_le, static_cast<double>(cumulative));
    } else {
      with_le.emplace_back("le", "+Inf");
      sample(base + "_bucket", with_le, static_cast<double>(h.count));
    }
  }
  sample(base + "_sum", labels, h.sum);
  sample(base + "_count", labels, static_cast<double>(h.count));
}

}  // namespace colcrypt::keyd
