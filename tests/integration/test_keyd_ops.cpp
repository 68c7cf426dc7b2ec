// colcrypt-keyd as an operator runs it: Prometheus metrics over HTTP and
// through keyctl, and SIGHUP (re-reading --config, reopening --log-file).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/client.hpp"
#include "core/error.hpp"
#include "harness.hpp"

using namespace colcrypt::test;
using nlohmann::json;

namespace {

colcrypt::client::Client keyd_client(const Sandbox& sandbox) {
  colcrypt::client::ClientOptions o;
  o.socket_path = sandbox.keyd_socket();
  o.timeout_ms = 5000;
  return colcrypt::client::Client(o);
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A loopback TCP port nobody listens on (bound and released: keyd takes it next).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  socklen_t len = sizeof addr;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(fd);
  return ntohs(addr.sin_port);
}

int connect_port(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

// Everything the server sends until it closes (or 5 s pass).
std::string read_until_closed(int fd) {
  std::string got;
  pollfd p{fd, POLLIN, 0};
  while (::poll(&p, 1, 5000) > 0) {
    char buf[4096];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

struct HttpReply {
  int status = 0;
  std::string headers;
  std::string body;
};

HttpReply parse_reply(const std::string& raw) {
  HttpReply r;
  const auto end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.", 0) != 0 || end == std::string::npos) return r;
  r.status = std::atoi(raw.c_str() + 9);
  r.headers = raw.substr(0, end);
  r.body = raw.substr(end + 4);
  return r;
}

HttpReply http(int port, const std::string& request) {
  int fd = connect_port(port);
  REQUIRE(::write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size()));
  HttpReply r = parse_reply(read_until_closed(fd));
  ::close(fd);
  return r;
}

HttpReply scrape(int port) { return http(port, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n"); }

// Parses the Prometheus text format (0.0.4) as strictly as a scraper does
// and returns series -> value ("name{labels as sent}"). Every sample needs a
// TYPE line before it (histogram samples: _bucket, _sum, _count of a
// histogram family); names and label names must be valid, label values
// properly escaped, counters end in _total, and histogram buckets are
// cumulative up to le="+Inf", which equals _count.
std::map<std::string, double> parse_exposition(const std::string& text) {
  static const std::regex metric_name("[a-zA-Z_:][a-zA-Z0-9_:]*");
  static const std::regex label_name("[a-zA-Z_][a-zA-Z0-9_]*");
  REQUIRE_FALSE(text.empty());
  REQUIRE(text.back() == '\n');
  std::map<std::string, std::string> types;  // family -> type
  std::set<std::string> helped;
  std::map<std::string, double> series;
  std::map<std::string, std::vector<std::pair<std::string, double>>> buckets;  // per histogram
  size_t start = 0;
  while (start < text.size()) {
    const size_t nl = text.find('\n', start);
    const std::string line = text.substr(start, nl - start);
    start = nl + 1;
    INFO("line: " << line);
    REQUIRE_FALSE(line.empty());
    if (line[0] == '#') {
      std::istringstream in(line);
      std::string hash, kind, name;
      in >> hash >> kind >> name;
      REQUIRE(hash == "#");
      REQUIRE((kind == "HELP" || kind == "TYPE"));
      REQUIRE(std::regex_match(name, metric_name));
      CHECK(name.rfind("colcrypt_keyd_", 0) == 0);
      if (kind == "HELP") {
        CHECK(helped.insert(name).second);
        continue;
      }
      std::string type;
      in >> type;
      REQUIRE((type == "counter" || type == "gauge" || type == "histogram"));
      CHECK(types.emplace(name, type).second);  // one TYPE per family
      CHECK(helped.count(name) == 1);
      if (type == "counter") CHECK(name.size() > 6);
      if (type == "counter") CHECK(name.compare(name.size() - 6, 6, "_total") == 0);
      continue;
    }
    // name{label="value",...} value
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    const std::string name = line.substr(0, i);
    REQUIRE(std::regex_match(name, metric_name));
    std::string le;
    std::string other_labels;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (line.at(i) != '}') {
        size_t eq = line.find('=', i);
        REQUIRE(eq != std::string::npos);
        const std::string lname = line.substr(i, eq - i);
        REQUIRE(std::regex_match(lname, label_name));
        REQUIRE(line.at(eq + 1) == '"');
        std::string value;
        size_t j = eq + 2;
        for (;; ++j) {
          const char c = line.at(j);
          if (c == '"') break;
          if (c == '\\') {
            const char e = line.at(++j);
            REQUIRE((e == '\\' || e == '"' || e == 'n'));
            value += e == 'n' ? '\n' : e;
          } else {
            value += c;
          }
        }
        if (lname == "le") {
          le = value;
        } else {
          other_labels += lname + "=" + value + ",";
        }
        i = j + 1;
        if (line.at(i) == ',') ++i;
      }
      ++i;
    }
    REQUIRE(line.at(i) == ' ');
    const std::string value_text = line.substr(i + 1);
    double value = 0;
    if (value_text == "+Inf") {
      value = INFINITY;
    } else {
      char* end = nullptr;
      value = std::strtod(value_text.c_str(), &end);
      REQUIRE(end == value_text.c_str() + value_text.size());
    }
    // Its family's TYPE came before it.
    std::string family = name;
    bool typed = types.count(name) == 1 && types[name] != "histogram";
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string s = suffix;
      if (!typed && name.size() > s.size() &&
          name.compare(name.size() - s.size(), s.size(), s) == 0) {
        family = name.substr(0, name.size() - s.size());
        typed = types.count(family) == 1 && types[family] == "histogram";
        if (typed && s == "_bucket") {
          REQUIRE_FALSE(le.empty());
          buckets[family + "{" + other_labels + "}"].emplace_back(le, value);
        }
      }
    }
    CHECK(typed);
    const std::string key = line.substr(0, i);
    CHECK(series.emplace(key, value).second);  // no series twice
  }
  for (const auto& [h, bs] : buckets) {
    INFO("histogram " << h);
    REQUIRE_FALSE(bs.empty());
    CHECK(bs.back().first == "+Inf");
    for (size_t k = 1; k < bs.size(); ++k) CHECK(bs[k].second >= bs[k - 1].second);
    const std::string family = h.substr(0, h.find('{'));
    CHECK(series.at(family + "_count") == bs.back().second);
  }
  return series;
}

double value_of(const std::map<std::string, double>& series, const std::string& key) {
  INFO("series " << key);
  auto it = series.find(key);
  REQUIRE(it != series.end());
  return it->second;
}

// Waits until keyd's log (after `from`) contains `what`.
bool log_shows(const Sandbox& sandbox, size_t from, const std::string& what) {
  for (int i = 0; i < 100; ++i) {
    const std::string log = sandbox.keyd_log();
    if (from < log.size() && contains(log.substr(from), what)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// "ok", or the name of the error a key fetch as root ends with.
std::string fetch_outcome(const Sandbox& sandbox, const std::string& key) {
  try {
    keyd_client(sandbox).fetch_primary_block(key, 0);
    return "ok";
  } catch (const colcrypt::Error& e) {
    return colcrypt::errc_name(e.code());
  }
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

}  // namespace

TEST_CASE("keyd serves Prometheus metrics over HTTP and through keyctl", "[keyd][metrics]") {
  const int port = free_port();
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {{"SANDBOX_KEYD_ARGS", "--metrics-listen 127.0.0.1:" + std::to_string(port)},
                 {"SANDBOX_KEYD_ALLOW_UID", postgres_uid() + ",0"}};
  Sandbox sandbox(options);
  sandbox.create_key("mk");
  sandbox.create_key("other");
  CHECK(contains(sandbox.keyd_log(), "serving metrics on http://127.0.0.1:"));

  const HttpReply first = scrape(port);
  REQUIRE(first.status == 200);
  CHECK(contains(first.headers, "Content-Type: text/plain; version=0.0.4"));
  const auto before = parse_exposition(first.body);
  CHECK(value_of(before, "colcrypt_keyd_fetches_total{key=\"mk\"}") == 0);
  CHECK(value_of(before, "colcrypt_keyd_key_versions{key=\"mk\",state=\"active\"}") == 1);
  const double uses_left = value_of(before, "colcrypt_keyd_key_uses_left{key=\"mk\"}");
  CHECK(uses_left > 0);
  CHECK_FALSE(contains(first.body, "colcrypt_keyd_denials_total{"));

  // Three block fetches (10 uses each) and one version fetch; a denial report.
  colcrypt::client::Client client = keyd_client(sandbox);
  colcrypt::wire::KeyGrantReply grant{};
  for (int i = 0; i < 3; ++i) grant = client.fetch_primary_block("mk", 10);
  client.fetch_version(grant.key.id, grant.key.version);
  client.report_denial({"mk", "decrypt", "app_role", "shop"});
  client.report_denial({"no such key", "decrypt", "app_role", "shop"});
  keyd_client(sandbox).fetch_primary_block("other", 0);
  sandbox.keyctl({"rotate", "other"});

  const HttpReply second = scrape(port);
  REQUIRE(second.status == 200);
  const auto after = parse_exposition(second.body);
  CHECK(value_of(after, "colcrypt_keyd_fetches_total{key=\"mk\"}") == 4);
  CHECK(value_of(after, "colcrypt_keyd_fetches_total{key=\"other\"}") == 1);
  CHECK(value_of(after, "colcrypt_keyd_fetch_duration_seconds_count") -
            value_of(before, "colcrypt_keyd_fetch_duration_seconds_count") ==
        5);
  CHECK(value_of(after, "colcrypt_keyd_fetch_duration_seconds_sum") > 0);
  CHECK(value_of(after, "colcrypt_keyd_denials_total{key=\"mk\",reason=\"sql\"}") == 1);
  // A name the store does not know is not a series of its own.
  CHECK(value_of(after, "colcrypt_keyd_denials_total{key=\"(unknown)\",reason=\"sql\"}") == 1);
  CHECK_FALSE(contains(second.body, "no such key"));
  CHECK(value_of(after, "colcrypt_keyd_key_uses_left{key=\"mk\"}") == uses_left - 30);
  CHECK(value_of(after, "colcrypt_keyd_key_versions{key=\"other\",state=\"active\"}") == 1);
  CHECK(value_of(after, "colcrypt_keyd_key_versions{key=\"other\",state=\"decrypt-only\"}") == 1);
  CHECK(value_of(after, "colcrypt_keyd_audit_write_duration_seconds_count") >
        value_of(before, "colcrypt_keyd_audit_write_duration_seconds_count"));
  CHECK(value_of(after, "colcrypt_keyd_audit_sync_duration_seconds_count") > 0);
  CHECK(value_of(after, "colcrypt_keyd_audit_write_failures_total") == 0);
  CHECK(value_of(after, "colcrypt_keyd_audit_sync_failures_total") == 0);
  CHECK(value_of(after, "colcrypt_keyd_audit_writable") == 1);
  // No key bytes: a fetched key's hex is nowhere in the text.
  std::string key_hex;
  for (size_t i = 0; i < grant.key.key.size(); ++i) {
    char b[3];
    std::snprintf(b, sizeof b, "%02x", grant.key.key.data()[i]);
    key_hex += b;
  }
  CHECK_FALSE(contains(second.body, key_hex.substr(0, 16)));

  // keyctl metrics prints the same text.
  const CommandResult via_keyctl = sandbox.keyctl({"metrics"});
  REQUIRE(via_keyctl.exit_code == 0);
  const auto keyctl_series = parse_exposition(via_keyctl.output);
  CHECK(value_of(keyctl_series, "colcrypt_keyd_fetches_total{key=\"mk\"}") == 4);

  // Only GET /metrics; bounded requests; a slow scraper holds nothing up.
  CHECK(http(port, "GET / HTTP/1.0\r\n\r\n").status == 404);
  CHECK(http(port, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").status == 405);
  CHECK(http(port, "garbage\r\n\r\n").status == 400);
  CHECK(http(port, "GET /metrics HTTP/1.0\r\nX: " + std::string(9000, 'a')).status == 431);
  std::vector<int> idle;
  for (int i = 0; i < 8; ++i) idle.push_back(connect_port(port));  // the scrapers' limit
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(http(port, "GET /metrics HTTP/1.0\r\n\r\n").status == 503);
  const auto start = std::chrono::steady_clock::now();
  CHECK(fetch_outcome(sandbox, "mk") == "ok");
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(1));
  for (int fd : idle) ::close(fd);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(scrape(port).status == 200);
}

TEST_CASE("--metrics-listen takes loopback addresses only (exit 64)", "[keyd][metrics]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.must("keyd-stop");
  for (const std::string address : {"0.0.0.0:9187", "192.0.2.1:9187", "[::]:9187", "127.0.0.1",
                                    "127.0.0.1:0", "localhost:http"}) {
    INFO("--metrics-listen " << address);
    const size_t log_before = sandbox.keyd_log().size();
    CommandResult r =
        sandbox.run("keyd-start", {{"SANDBOX_KEYD_ARGS", "--metrics-listen " + address}});
    CHECK(r.exit_code == 64);
    CHECK(contains(sandbox.keyd_log().substr(log_before), "--metrics-listen " + address));
  }
  CHECK(sandbox
            .run("keyd-start",
                 {{"SANDBOX_KEYD_ARGS", "--metrics-listen [::1]:" + std::to_string(free_port())}})
            .exit_code == 0);
}

TEST_CASE("SIGHUP re-reads --config; a broken file keeps the old settings", "[keyd][reload]") {
  const std::string pg = postgres_uid();
  // keyd reads its allowlists from the file only (the sandbox passes none).
  char dir_pattern[] = "/tmp/colcrypt-reload.XXXXXX";
  REQUIRE(::mkdtemp(dir_pattern) != nullptr);
  const std::string conf = std::string(dir_pattern) + "/keyd.conf";
  auto config = [&](const std::string& allow, const std::string& extra = "") {
    write_file(conf, "allow-uid = [" + allow + "]\nadmin-uid = [\"0\"]\n" + extra);
  };
  config("\"" + pg + "\"");
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {{"SANDBOX_KEYD_CONFIG", conf}};
  Sandbox sandbox(options);
  sandbox.create_key("rk");
  const pid_t keyd = sandbox.keyd_pid();

  // root administers but is not on allow-uid: no key.
  CHECK(fetch_outcome(sandbox, "rk") == "permission denied");

  // Gains access: the file now lists root; SIGHUP.
  config("\"" + pg + "\", \"0\"", "log-level = \"debug\"\n");
  size_t mark = sandbox.keyd_log().size();
  REQUIRE(::kill(keyd, SIGHUP) == 0);
  REQUIRE(log_shows(sandbox, mark, "reloaded " + conf));
  CHECK(fetch_outcome(sandbox, "rk") == "ok");
  CHECK(log_shows(sandbox, mark, "DEBUG: accepted peer uid=0"));  // the new log level

  // A broken file: an error, and the settings stay as they were (each of
  // these would take root off allow-uid if it were applied).
  const std::string drop_root = "allow-uid = [\"" + pg + "\"]\nadmin-uid = [\"0\"]\n";
  for (const std::string& broken :
       {drop_root + "no-such-option = 1\n", drop_root + "log-level = \"loud\"\n",
        std::string("allow-uid = [\"no_such_user_xyz\"]\n"), std::string()}) {
    INFO("config: " << broken);
    if (broken.empty()) {
      std::filesystem::remove(conf);  // a missing file
    } else {
      write_file(conf, broken);
    }
    mark = sandbox.keyd_log().size();
    REQUIRE(::kill(keyd, SIGHUP) == 0);
    REQUIRE(log_shows(sandbox, mark, "keeping the current settings"));
    CHECK(fetch_outcome(sandbox, "rk") == "ok");
  }
  CHECK(::kill(keyd, 0) == 0);  // still serving

  // Loses access; a setting that needs a restart is named, not applied.
  const std::string audit_before = read_file(sandbox.store_dir() + "/audit.log");
  config("\"" + pg + "\"", "max-block-uses = 100\n");
  mark = sandbox.keyd_log().size();
  REQUIRE(::kill(keyd, SIGHUP) == 0);
  REQUIRE(log_shows(sandbox, mark, "reloaded " + conf));
  CHECK(log_shows(sandbox, mark, "max-block-uses"));
  CHECK(log_shows(sandbox, mark, "needs a restart"));
  CHECK(fetch_outcome(sandbox, "rk") == "permission denied");
  const std::string audited =
      read_file(sandbox.store_dir() + "/audit.log").substr(audit_before.size());
  CHECK(contains(audited, "\"event\":\"reload\""));
  CHECK(contains(audited, "\"event\":\"fetch-denied\""));
  CHECK(json::parse(sandbox.keyctl({"--json", "audit", "verify"}).output)["ok"] == true);
  std::filesystem::remove_all(dir_pattern);
}

TEST_CASE("SIGHUP reopens --log-file for logrotate", "[keyd][reload]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  // keyd logs to the file the sandbox watches (DIR/keyd.log) itself, not through stderr.
  sandbox.must("keyd-stop");
  const std::string log = sandbox.dir() + "/keyd.log";
  sandbox.must("keyd-start", {{"SANDBOX_KEYD_ARGS", "--log-file " + log}});
  const pid_t keyd = sandbox.keyd_pid();
  REQUIRE(std::rename(log.c_str(), (log + ".1").c_str()) == 0);  // what logrotate does
  sandbox.create_key("after_rotate");  // logged to the moved file: keyd still has it open
  CHECK(contains(read_file(log + ".1"), "created key 'after_rotate'"));
  REQUIRE(::kill(keyd, SIGHUP) == 0);
  REQUIRE(log_shows(sandbox, 0, "SIGHUP"));
  sandbox.create_key("after_reopen");
  CHECK(log_shows(sandbox, 0, "created key 'after_reopen'"));
  CHECK_FALSE(contains(read_file(log + ".1"), "after_reopen"));
}
