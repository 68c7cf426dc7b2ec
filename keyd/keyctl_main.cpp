// colcrypt-keyctl: the admin client of colcrypt-keyd.
// Exit codes: 0 ok, 1 keyd answered with an error, 2 usage, 3 cannot reach keyd.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "keyd/client.hpp"

namespace {

using nlohmann::json;

constexpr int kExitOk = 0;
constexpr int kExitKeydError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitUnreachable = 3;
constexpr const char* kDefaultSocket = "/run/colcrypt/keyd.sock";

std::string text_or(const json& j, const char* field, const char* if_null = "never") {
  if (!j.contains(field) || j[field].is_null()) return if_null;
  if (j[field].is_string()) return j[field].get<std::string>();
  return j[field].dump();
}

void print_key(const json& k) {
  const std::vector<std::pair<const char*, std::string>> rows = {
      {"name", text_or(k, "name")},
      {"id", text_or(k, "id")},
      {"algorithm", text_or(k, "algorithm")},
      {"created_at", text_or(k, "created_at")},
      {"expires_at", text_or(k, "expires_at")},
      {"rotation_interval_days", text_or(k, "rotation_interval_days")},
      {"last_used", text_or(k, "last_used")},
      {"usage_count", text_or(k, "usage_count")},
      {"primary_version", text_or(k, "primary_version")},
  };
  for (const auto& [label, value] : rows)
    std::printf("%-24s%s\n", (std::string(label) + ":").c_str(), value.c_str());
  std::printf("versions:\n");
  for (const auto& v : k.value("versions", json::array())) {
    std::printf("  %-6s%-14s%s\n", text_or(v, "version").c_str(), text_or(v, "state").c_str(),
                text_or(v, "created_at").c_str());
  }
}

void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

void print_list(const json& reply) {
  const json keys = reply.value("keys", json::array());
  if (keys.empty()) {
    std::printf("no keys (create one with: colcrypt-keyctl create NAME)\n");
    return;
  }
  std::vector<std::vector<std::string>> rows = {{"NAME", "ID", "VERSION", "VERSIONS", "CREATED",
                                                 "EXPIRES", "ROTATE (DAYS)", "LAST USED", "USES"}};
  for (const auto& k : keys) {
    rows.push_back({text_or(k, "name"), text_or(k, "id"), text_or(k, "primary_version"),
                    std::to_string(k.value("versions", json::array()).size()),
                    text_or(k, "created_at"), text_or(k, "expires_at"),
                    text_or(k, "rotation_interval_days"), text_or(k, "last_used"),
                    text_or(k, "usage_count")});
  }
  print_table(rows);
}

void print_status(const json& s) {
  for (const char* field :
       {"version", "uptime_seconds", "key_count", "store", "socket", "locked"}) {
    std::printf("%-16s%s\n", (std::string(field) + ":").c_str(), text_or(s, field, "-").c_str());
  }
}

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "colcrypt-keyctl: error: %s\n", message.c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket;
  bool raw_json = false;
  int timeout_ms = 5000;
  std::string name;
  std::optional<int64_t> rotation_days;
  std::string expires_at;

  CLI::App app{"colcrypt-keyctl: administer colcrypt-keyd (keys: create, list, show, rotate)",
               "colcrypt-keyctl"};
  app.add_option("--socket", socket,
                 std::string("colcrypt-keyd socket (default: $COLCRYPT_KEYD_SOCKET, else ") +
                     kDefaultSocket + ")");
  app.add_flag("--json", raw_json, "print keyd's JSON reply instead of text");
  app.add_option("--timeout-ms", timeout_ms, "how long to wait for keyd (default 5000)")
      ->check(CLI::Range(1, 3600 * 1000));
  app.require_subcommand(1);
  auto* create = app.add_subcommand("create", "create a key with a random version 1");
  create->add_option("name", name, "key name")->required();
  create->add_option("--rotation-days", rotation_days, "rotation interval in days")
      ->check(CLI::Range(1, 36500));
  create->add_option("--expires-at", expires_at,
                     "expiry, ISO 8601 (2027-01-31 or 2027-01-31T12:00:00Z)");
  app.add_subcommand("list", "list all keys");
  auto* show = app.add_subcommand("show", "show one key and its versions");
  show->add_option("name", name, "key name")->required();
  auto* rotate = app.add_subcommand("rotate", "make a new random version the primary one");
  rotate->add_option("name", name, "key name")->required();
  app.add_subcommand("status", "show keyd's status");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    return fail(kExitUsage, std::string(e.what()) + " (see colcrypt-keyctl --help)");
  }

  if (socket.empty()) {
    const char* env = std::getenv("COLCRYPT_KEYD_SOCKET");
    socket = env && *env ? env : kDefaultSocket;
  }
  const std::string command = app.get_subcommands().front()->get_name();
  json request = {{"op", command}};
  if (command == "create" || command == "show" || command == "rotate") request["name"] = name;
  if (command == "create") {
    if (rotation_days) request["rotation_interval_days"] = *rotation_days;
    if (!expires_at.empty()) request["expires_at"] = expires_at;
  }

  colcrypt::keyd::ClientOptions options;
  options.socket_path = socket;
  options.timeout_ms = timeout_ms;
  std::string reply_text;
  try {
    colcrypt::keyd::Client client(options);
    reply_text = client.admin(request.dump());
  } catch (const colcrypt::Error& e) {
    switch (e.code()) {
      case colcrypt::Errc::KeydUnavailable:
      case colcrypt::Errc::KeydTimeout:
      case colcrypt::Errc::Io:
        return fail(kExitUnreachable, e.what());
      default:
        return fail(kExitKeydError, e.what());
    }
  }

  json reply;
  try {
    reply = json::parse(reply_text);
  } catch (const json::exception&) {
    return fail(kExitKeydError, "colcrypt-keyd sent a reply that is not JSON");
  }
  if (raw_json) {
    std::printf("%s\n", reply.dump(2).c_str());
    return kExitOk;
  }
  if (command == "create") {
    std::printf("created key '%s'\n", text_or(reply, "name").c_str());
    print_key(reply);
  } else if (command == "rotate") {
    std::printf("rotated key '%s': version %s is now primary\n", text_or(reply, "name").c_str(),
                text_or(reply, "primary_version").c_str());
    print_key(reply);
  } else if (command == "show") {
    print_key(reply);
  } else if (command == "list") {
    print_list(reply);
  } else {
    print_status(reply);
  }
  return kExitOk;
}
