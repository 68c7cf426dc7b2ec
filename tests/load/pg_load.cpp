// colcrypt-load-pg: Postgres sessions encrypting and decrypting while keyd is
// killed (SIGKILL) and started again every few seconds (issue 10).
//
//   colcrypt-load-pg CONNINFO KEY_NAME SECONDS SESSIONS KILL_COMMAND START_COMMAND
//
// SESSIONS threads, one libpq connection each, with colcrypt.key_cache_ttl = 0
// so that every statement asks keyd, run back to back for SECONDS:
//   a round trip   SELECT decrypt_field(encrypt_field($1, KEY))   = $1
//   a stored value SELECT decrypt_field(v), plain FROM load_values WHERE id = $1
// Meanwhile the main thread runs KILL_COMMAND and, 0.5 s later, START_COMMAND
// (shell commands) every 3 seconds. Every statement must either return the
// right plaintext or fail with SQLSTATE 58000 / 58030 (keyd unreachable or
// gone mid-exchange); a wrong result, another error or a lost connection is
// a failure. Prints "name=value" lines; exits 1 on any failure.
#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Totals {
  std::atomic<long> ok{0}, keyd_errors{0}, wrong{0}, other_errors{0}, connections_lost{0};
  std::mutex mutex;
  std::vector<std::string> samples;  // the first few unexpected outcomes

  void note(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex);
    if (samples.size() < 10) samples.push_back(what);
  }
};

PGconn* connect(const std::string& conninfo, Totals& totals) {
  PGconn* conn = PQconnectdb(conninfo.c_str());
  if (PQstatus(conn) != CONNECTION_OK) {
    totals.note(std::string("connect: ") + PQerrorMessage(conn));
    PQfinish(conn);
    return nullptr;
  }
  PGresult* r = PQexec(conn, "SET colcrypt.key_cache_ttl = 0");
  PQclear(r);
  return conn;
}

void session(const std::string& conninfo, const std::string& key, int index,
             const std::atomic<bool>& stop, Totals& totals) {
  PGconn* conn = connect(conninfo, totals);
  std::mt19937_64 rng(static_cast<uint64_t>(index) * 7919 + 1);
  const std::string round_trip =
      "SELECT colcrypt.decrypt_field(colcrypt.encrypt_field($1::text, '" + key + "'))";
  const std::string stored =
      "SELECT colcrypt.decrypt_field(v), plain FROM load_values WHERE id = $1::int";
  long n = 0;
  while (!stop.load()) {
    if (conn == nullptr) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      conn = connect(conninfo, totals);
      continue;
    }
    const bool trip = (n++ % 2) == 0;
    const std::string arg = trip ? "secret-" + std::to_string(index) + "-" + std::to_string(n) +
                                       "-" + std::to_string(rng())
                                 : std::to_string(1 + rng() % 100);
    const char* params[1] = {arg.c_str()};
    PGresult* r = PQexecParams(conn, trip ? round_trip.c_str() : stored.c_str(), 1, nullptr, params,
                               nullptr, nullptr, 0);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
      const bool right = PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
                         (trip ? arg == PQgetvalue(r, 0, 0)
                               : std::string(PQgetvalue(r, 0, 0)) == PQgetvalue(r, 0, 1));
      if (right) {
        ++totals.ok;
      } else {
        ++totals.wrong;
        totals.note("wrong result for " + std::string(trip ? "a round trip" : "a stored value"));
      }
    } else if (PQstatus(conn) != CONNECTION_OK) {
      ++totals.connections_lost;
      totals.note(std::string("connection lost: ") + PQerrorMessage(conn));
      PQfinish(conn);
      conn = nullptr;
    } else {
      const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
      const std::string sqlstate = state ? state : "";
      if (sqlstate == "58000" || sqlstate == "58030") {
        ++totals.keyd_errors;
      } else {
        ++totals.other_errors;
        totals.note("SQLSTATE " + sqlstate + ": " + PQresultErrorMessage(r));
      }
    }
    PQclear(r);
  }
  if (conn) PQfinish(conn);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr,
                 "usage: %s CONNINFO KEY_NAME SECONDS SESSIONS KILL_COMMAND START_COMMAND\n",
                 argv[0]);
    return 2;
  }
  const std::string conninfo = argv[1], key = argv[2];
  const int seconds = std::atoi(argv[3]), sessions = std::atoi(argv[4]);
  const std::string kill_command = argv[5], start_command = argv[6];
  if (seconds <= 0 || sessions <= 0) {
    std::fprintf(stderr, "SECONDS and SESSIONS must be positive\n");
    return 2;
  }
  Totals totals;
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < sessions; ++i) {
    threads.emplace_back(session, conninfo, key, i, std::cref(stop), std::ref(totals));
  }
  int kills = 0, failed_restarts = 0;
  const auto end = Clock::now() + std::chrono::seconds(seconds);
  while (Clock::now() + std::chrono::seconds(3) < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    if (std::system(kill_command.c_str()) != 0) ++failed_restarts;
    ++kills;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    if (std::system(start_command.c_str()) != 0) ++failed_restarts;
  }
  std::this_thread::sleep_until(end);
  stop = true;
  for (auto& t : threads) t.join();

  std::printf("seconds=%d\nsessions=%d\nkeyd_kills=%d\nfailed_restarts=%d\n", seconds, sessions,
              kills, failed_restarts);
  std::printf("statements_ok=%ld\nstatements_58000_58030=%ld\nwrong_results=%ld\n",
              totals.ok.load(), totals.keyd_errors.load(), totals.wrong.load());
  std::printf("other_errors=%ld\nconnections_lost=%ld\n", totals.other_errors.load(),
              totals.connections_lost.load());
  for (const auto& s : totals.samples) std::fprintf(stderr, "unexpected: %s\n", s.c_str());
  const bool ok = totals.ok > 0 && totals.keyd_errors > 0 && totals.wrong == 0 &&
                  totals.other_errors == 0 && totals.connections_lost == 0 && kills > 0 &&
                  failed_restarts == 0;
  return ok ? 0 : 1;
}
