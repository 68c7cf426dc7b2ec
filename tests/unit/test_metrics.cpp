// keyd's Prometheus text: escaping, histograms, and the loopback-only endpoint address.
#include <catch2/catch.hpp>
#include <string>

#include "core/error.hpp"
#include "keyd/metrics.hpp"
#include "keyd/metrics_http.hpp"

using namespace colcrypt;
using namespace colcrypt::keyd;

TEST_CASE("metrics: label values and HELP text are escaped", "[keyd][metrics]") {
  CHECK(escape_label_value("plain_key") == "plain_key");
  CHECK(escape_label_value("a\"b\\c\nd") == "a\\\"b\\\\c\\nd");
  MetricsText m;
  m.family("colcrypt_keyd_x_total", "counter", "line one\nback\\slash \"quoted\"");
  m.sample("colcrypt_keyd_x_total", {{"key", "k\"1"}}, 3);
  m.sample("colcrypt_keyd_x_total", {{"key", "k2"}, {"reason", "sql"}}, 1e20);
  CHECK(m.text() ==
        "# HELP colcrypt_keyd_x_total line one\\nback\\\\slash \"quoted\"\n"
        "# TYPE colcrypt_keyd_x_total counter\n"
        "colcrypt_keyd_x_total{key=\"k\\\"1\"} 3\n"
        "colcrypt_keyd_x_total{key=\"k2\",reason=\"sql\"} 1e+20\n");
}

TEST_CASE("metrics: a histogram's buckets are cumulative and end at +Inf", "[keyd][metrics]") {
  LatencyHistogram h;
  h.observe(0.00005);  // first bucket
  h.observe(0.003);    // le 0.005
  h.observe(0.003);
  h.observe(7.0);  // beyond the last bound: +Inf only
  h.observe(-1);   // a clock step: counted as 0
  MetricsText m;
  m.family("colcrypt_keyd_t_seconds", "histogram", "t");
  m.histogram("colcrypt_keyd_t_seconds", {}, h);
  const std::string& t = m.text();
  CHECK(t.find("colcrypt_keyd_t_seconds_bucket{le=\"0.0001\"} 2\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_bucket{le=\"0.0025\"} 2\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_bucket{le=\"0.005\"} 4\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_bucket{le=\"2.5\"} 4\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_bucket{le=\"+Inf\"} 5\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_count 5\n") != std::string::npos);
  CHECK(t.find("colcrypt_keyd_t_seconds_sum 7.00605\n") != std::string::npos);
}

TEST_CASE("metrics: --metrics-listen takes loopback addresses only", "[keyd][metrics]") {
  for (const char* ok : {"127.0.0.1:9187", "127.1.2.3:1", "localhost:65535", "[::1]:9187"}) {
    INFO(ok);
    CHECK_NOTHROW(MetricsHttp::check_address(ok));
  }
  for (const char* bad : {"0.0.0.0:9187", "10.0.0.1:9187", "[::]:9187", "[::ffff:127.0.0.1]:1",
                          "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
                          "127.0.0.1:http", ":9187", "example.com:9187", "[::1]", "::1:9187"}) {
    INFO(bad);
    try {
      MetricsHttp::check_address(bad);
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::InvalidArgument);
    }
  }
}
