// colcrypt-bench-keyd: cold key fetch latency against a running colcrypt-keyd.
// "Cold" is what a backend pays for a key its cache does not hold: one fetch
// from keyd. CLIENTS threads start together and each makes REQUESTS fetches
// back to back; the latency of every fetch is recorded.
// OP is "primary" (what encryption fetches: keyd charges the use to the key)
// or "version" (what decryption fetches: a given key id and version).
// CONNECTION is "kept" (each client keeps its connection between fetches, as
// a backend's client::Client does) or "new" (a new connection per fetch, what
// the first fetch of a new backend pays: connect, send, receive).
//
//   colcrypt-bench-keyd SOCKET KEY_NAME CLIENTS REQUESTS [primary|version] [kept|new] [RATE]
// prints one line:  requests=N errors=E p50_us=X p99_us=Y max_us=Z per_s=R
// (R: fetches per second over the whole run) and exits 1 when any fetch
// failed (the first error goes to stderr).
//
// This is a closed loop: every client starts its next fetch as soon as the
// last one returned, so CLIENTS fetches are always in flight and the mean
// latency is CLIENTS / R (Little's law). With 64 clients on 2 cores the
// latency figures measure throughput (CPU per fetch, client side included);
// 1 client measures the service time of one fetch.
//
// With RATE (fetches per second, all clients together) the loop is open: each
// client sends its fetches on a fixed schedule (every CLIENTS / RATE seconds,
// the clients' schedules staggered evenly), whether or not keyd kept up, and a
// fetch's latency counts from the moment it was due, not from when it was
// sent, so that a stalled keyd is charged for the fetches that queued behind
// it (no coordinated omission). That is how backends with warm caches ask:
// rarely, independently of each other.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/client.hpp"

namespace {

double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(rank, sorted.size() - 1)];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 8) {
    std::fprintf(stderr,
                 "usage: %s SOCKET KEY_NAME CLIENTS REQUESTS [primary|version] [kept|new] [RATE]\n",
                 argv[0]);
    return 2;
  }
  const std::string socket_path = argv[1];
  const std::string key_name = argv[2];
  const int clients = std::atoi(argv[3]);
  const int requests = std::atoi(argv[4]);
  const std::string op = argc >= 6 ? argv[5] : "primary";
  const std::string connection = argc >= 7 ? argv[6] : "kept";
  const double rate = argc == 8 ? std::atof(argv[7]) : 0.0;
  if (clients <= 0 || requests <= 0 || (op != "primary" && op != "version") ||
      (connection != "kept" && connection != "new") || (argc == 8 && !(rate > 0))) {
    std::fprintf(stderr,
                 "CLIENTS and REQUESTS must be positive, OP primary or version, CONNECTION kept "
                 "or new, RATE positive\n");
    return 2;
  }
  colcrypt::KeyId key_id{};
  uint32_t key_version = 0;
  if (op == "version") {
    try {
      colcrypt::client::ClientOptions options;
      options.socket_path = socket_path;
      colcrypt::client::Client client(std::move(options));
      const colcrypt::wire::KeyReply reply = client.fetch_primary(key_name);
      key_id = reply.id;
      key_version = reply.version;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "colcrypt-bench-keyd: cannot fetch key '%s': %s\n", key_name.c_str(),
                   e.what());
      return 1;
    }
  }

  std::vector<std::vector<double>> latencies(static_cast<size_t>(clients));
  std::atomic<int> errors{0};
  std::mutex mu;
  std::condition_variable cv;
  std::string first_error;
  int ready = 0;
  bool go = false;

  // Open loop: client t's fetch i is due at start + (i + t / clients) * period.
  using Clock = std::chrono::steady_clock;
  const Clock::duration period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(rate > 0 ? clients / rate : 0.0));
  Clock::time_point started;

  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      auto& mine = latencies[static_cast<size_t>(t)];
      mine.reserve(static_cast<size_t>(requests));
      colcrypt::client::ClientOptions options;
      options.socket_path = socket_path;
      options.timeout_ms = 10000;
      colcrypt::client::Client client(std::move(options));
      {
        std::unique_lock<std::mutex> lock(mu);
        ++ready;
        cv.notify_all();
        cv.wait(lock, [&] { return go; });
      }
      const Clock::time_point first_due = started + period * t / clients;
      for (int i = 0; i < requests; ++i) {
        Clock::time_point start;
        if (rate > 0) {
          start = first_due + period * i;
          std::this_thread::sleep_until(start);
        } else {
          start = Clock::now();
        }
        try {
          if (connection == "new") client.disconnect();
          colcrypt::wire::KeyReply reply = op == "primary"
                                               ? client.fetch_primary(key_name)
                                               : client.fetch_version(key_id, key_version);
          if (reply.key.size() != 32) throw std::runtime_error("key of the wrong size");
        } catch (const std::exception& e) {
          if (errors.fetch_add(1) == 0) {
            std::lock_guard<std::mutex> lock(mu);
            first_error = e.what();
          }
          continue;
        }
        const auto end = std::chrono::steady_clock::now();
        mine.push_back(std::chrono::duration<double, std::micro>(end - start).count());
      }
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return ready == clients; });
    go = true;
    started = Clock::now();  // read by the clients only after they see go
  }
  cv.notify_all();
  for (auto& th : threads) th.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<double> all;
  for (const auto& v : latencies) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  std::printf("requests=%zu errors=%d p50_us=%.1f p99_us=%.1f max_us=%.1f per_s=%.0f\n", all.size(),
              errors.load(), percentile(all, 0.50), percentile(all, 0.99),
              all.empty() ? 0.0 : all.back(),
              seconds > 0 ? static_cast<double>(all.size()) / seconds : 0.0);
  if (errors.load() > 0) {
    std::fprintf(stderr, "colcrypt-bench-keyd: %d fetches failed; first: %s\n", errors.load(),
                 first_error.c_str());
    return 1;
  }
  return 0;
}
