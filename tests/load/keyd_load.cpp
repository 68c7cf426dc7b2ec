// colcrypt-load-keyd: keyd under hostile and heavy load (issue 10). Against a
// running colcrypt-keyd, for SECONDS:
//   * HOSTILE raw connections on its Unix socket, held open all along (each
//     reconnects 10-60 ms after it is dropped): half are slow (a valid fetch request,
//     one byte per second), the rest in equal parts send an oversized frame
//     header, garbage, or half a frame and then close;
//   * CLIENTS well-behaved clients (client::Client, kept connections, as a
//     backend) fetch keys back to back with a 5 ms pause: a primary block,
//     then the version it got.
// keyd's RSS and open fds are read from /proc before the hostile phase (after
// a warm-up with the clients alone), at their peak, and once every hostile
// connection is closed and keyd had time to drop them.
//
//   colcrypt-load-keyd SOCKET KEY_NAME KEYD_PID [SECONDS [HOSTILE [CLIENTS]]]
// prints "name=value" lines (keyd_rss_within_10pct: the goal in
// docs/reliability.md) and exits 1 when a well-behaved fetch failed, the fds
// did not come back, or the RSS grew by more than max(10%, 8 MiB): glibc keeps
// freed heap, so a small keyd may stay a few MiB above its start with no leak,
// while a leak per connection grows far beyond that.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/client.hpp"
#include "core/wire.hpp"

namespace {

using Clock = std::chrono::steady_clock;
namespace wire = colcrypt::wire;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(rank, v.size() - 1)];
}

long rss_kib(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return -1;
}

long open_fds(int pid) {
  std::error_code ec;
  long n = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++n;
  }
  return ec ? -1 : n;
}

enum class Kind { Slow, Oversized, Garbage, HalfFrame };
struct Hostile {
  Kind kind = Kind::Slow;
  int fd = -1;
  size_t sent = 0;  // slow: bytes of `request` sent
  Clock::time_point next_action;
};

int connect_nonblocking(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 && errno != EINPROGRESS &&
      errno != EAGAIN) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// The hostile side: one thread, one epoll set, every connection reopened
// when keyd drops it. Counts what keyd did to them.
struct HostileStats {
  std::atomic<long> connects{0}, connect_failures{0}, dropped_by_keyd{0}, replies{0};
  std::atomic<long> open_now{0};
};

void run_hostile(const std::string& path, const std::string& key, int count,
                 const std::atomic<bool>& stop, HostileStats& stats) {
  const std::vector<uint8_t> request = wire::encode_fetch_primary_block(key, 1);
  std::vector<Hostile> conns(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    conns[i].kind = i % 2 == 0 ? Kind::Slow : static_cast<Kind>(1 + (i / 2) % 3);
  }
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  std::mt19937 rng(42);
  auto open_one = [&](size_t i, Clock::time_point now) {
    Hostile& h = conns[i];
    h.fd = connect_nonblocking(path);
    h.sent = 0;
    if (h.fd < 0) {
      ++stats.connect_failures;
      h.next_action = now + std::chrono::milliseconds(200);
      return;
    }
    ++stats.connects;
    ++stats.open_now;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = i;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, h.fd, &ev);
    // Spread the first actions over a second.
    h.next_action = now + std::chrono::milliseconds(rng() % 1000);
  };
  auto close_one = [&](size_t i, Clock::time_point now, bool by_keyd) {
    Hostile& h = conns[i];
    if (h.fd < 0) return;
    ::epoll_ctl(ep, EPOLL_CTL_DEL, h.fd, nullptr);
    ::close(h.fd);
    h.fd = -1;
    --stats.open_now;
    if (by_keyd) ++stats.dropped_by_keyd;
    h.next_action = now + std::chrono::milliseconds(10 + rng() % 50);  // then reconnect
  };
  auto start = Clock::now();
  for (size_t i = 0; i < conns.size(); ++i) open_one(i, start);

  std::vector<epoll_event> events(256);
  while (!stop.load()) {
    int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), 20);
    const auto now = Clock::now();
    for (int e = 0; e < n; ++e) {
      const size_t i = events[e].data.u64;
      char buf[4096];
      ssize_t r = ::recv(conns[i].fd, buf, sizeof buf, MSG_DONTWAIT);
      if (r > 0) ++stats.replies;
      if (r == 0 || (r < 0 && errno != EAGAIN) || (events[e].events & (EPOLLHUP | EPOLLRDHUP))) {
        close_one(i, now, true);
      }
    }
    for (size_t i = 0; i < conns.size(); ++i) {
      Hostile& h = conns[i];
      if (now < h.next_action) continue;
      if (h.fd < 0) {
        open_one(i, now);
        continue;
      }
      switch (h.kind) {
        case Kind::Slow:  // one byte per second of a valid request, forever
          ::send(h.fd, &request[h.sent % request.size()], 1, MSG_DONTWAIT | MSG_NOSIGNAL);
          ++h.sent;
          h.next_action = now + std::chrono::seconds(1);
          break;
        case Kind::Oversized: {  // a 64 MiB frame announced, 1 KiB of it sent
          std::vector<uint8_t> frame(1024, 0x41);
          const uint32_t len = 64u << 20;
          frame[0] = len >> 24, frame[1] = (len >> 16) & 0xff, frame[2] = (len >> 8) & 0xff,
          frame[3] = len & 0xff;
          ::send(h.fd, frame.data(), frame.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
          h.next_action = now + std::chrono::seconds(1);
          break;
        }
        case Kind::Garbage: {
          std::vector<uint8_t> junk(64 + rng() % 512);
          for (auto& b : junk) b = static_cast<uint8_t>(rng());
          ::send(h.fd, junk.data(), junk.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
          h.next_action = now + std::chrono::seconds(1);
          break;
        }
        case Kind::HalfFrame:
          ::send(h.fd, request.data(), request.size() / 2, MSG_DONTWAIT | MSG_NOSIGNAL);
          close_one(i, now, false);
          break;
      }
    }
  }
  for (size_t i = 0; i < conns.size(); ++i) close_one(i, Clock::now(), false);
  ::close(ep);
}

struct GoodStats {
  std::mutex mutex;
  std::vector<double> latencies_ms;
  long errors = 0;
  std::string first_error;
};

void run_good(const std::string& path, const std::string& key, const std::atomic<bool>& stop,
              const std::atomic<bool>& measuring, GoodStats& stats) {
  colcrypt::client::ClientOptions o;
  o.socket_path = path;
  o.timeout_ms = 5000;
  colcrypt::client::Client client(o);
  std::vector<double> mine;
  long errors = 0;
  std::string first_error;
  while (!stop.load()) {
    for (int op = 0; op < 2 && !stop.load(); ++op) {
      const auto t0 = Clock::now();
      try {
        if (op == 0) {
          client.fetch_primary_block(key, 1);
        } else {
          static thread_local colcrypt::KeyId id{};
          static thread_local uint32_t version = 0;
          if (version == 0) {
            auto r = client.fetch_primary(key);
            id = r.id, version = r.version;
          }
          client.fetch_version(id, version);
        }
        if (measuring.load())
          mine.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      } catch (const std::exception& e) {
        if (measuring.load()) {
          ++errors;
          if (first_error.empty()) first_error = e.what();
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  std::lock_guard<std::mutex> lock(stats.mutex);
  stats.latencies_ms.insert(stats.latencies_ms.end(), mine.begin(), mine.end());
  stats.errors += errors;
  if (stats.first_error.empty()) stats.first_error = first_error;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 7) {
    std::fprintf(stderr, "usage: %s SOCKET KEY_NAME KEYD_PID [SECONDS [HOSTILE [CLIENTS]]]\n",
                 argv[0]);
    return 2;
  }
  const std::string path = argv[1], key = argv[2];
  const int pid = std::atoi(argv[3]);
  const int seconds = argc > 4 ? std::atoi(argv[4]) : 60;
  const int hostile = argc > 5 ? std::atoi(argv[5]) : 992;
  const int clients = argc > 6 ? std::atoi(argv[6]) : 8;
  if (pid <= 0 || seconds <= 0 || hostile < 0 || clients <= 0) {
    std::fprintf(stderr, "KEYD_PID and SECONDS must be positive\n");
    return 2;
  }

  std::atomic<bool> stop_good{false}, stop_hostile{false}, measuring{false};
  GoodStats good;
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back(run_good, path, key, std::cref(stop_good), std::cref(measuring),
                         std::ref(good));
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));  // warm-up: keyd's steady state
  const long rss_before = rss_kib(pid), fds_before = open_fds(pid);

  HostileStats hs;
  measuring = true;
  std::thread hostile_thread(run_hostile, path, key, hostile, std::cref(stop_hostile),
                             std::ref(hs));
  long rss_peak = rss_before, fds_peak = fds_before, most_open = 0;
  const auto end = Clock::now() + std::chrono::seconds(seconds);
  while (Clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    rss_peak = std::max(rss_peak, rss_kib(pid));
    fds_peak = std::max(fds_peak, open_fds(pid));
    most_open = std::max(most_open, hs.open_now.load());
  }
  measuring = false;
  stop_hostile = true;
  hostile_thread.join();
  // keyd drops what the hostile side closed on its next turn; the clients keep fetching.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const long rss_after = rss_kib(pid), fds_after = open_fds(pid);
  stop_good = true;
  for (auto& t : threads) t.join();

  const double p50 = percentile(good.latencies_ms, 0.50);
  const double p99 = percentile(good.latencies_ms, 0.99);
  const double max = percentile(good.latencies_ms, 1.0);
  std::printf("seconds=%d\nhostile_connections=%d\nhostile_open_max=%ld\n", seconds, hostile,
              most_open);
  std::printf("hostile_connects=%ld\nhostile_connect_failures=%ld\nhostile_dropped_by_keyd=%ld\n",
              hs.connects.load(), hs.connect_failures.load(), hs.dropped_by_keyd.load());
  std::printf("good_clients=%d\ngood_fetches=%zu\ngood_errors=%ld\n", clients,
              good.latencies_ms.size(), good.errors);
  std::printf("good_p50_ms=%.3f\ngood_p99_ms=%.3f\ngood_max_ms=%.3f\n", p50, p99, max);
  std::printf("keyd_rss_kib_before=%ld\nkeyd_rss_kib_peak=%ld\nkeyd_rss_kib_after=%ld\n",
              rss_before, rss_peak, rss_after);
  std::printf("keyd_fds_before=%ld\nkeyd_fds_peak=%ld\nkeyd_fds_after=%ld\n", fds_before, fds_peak,
              fds_after);
  if (!good.first_error.empty())
    std::fprintf(stderr, "first error: %s\n", good.first_error.c_str());
  const bool rss_within_10pct = rss_after * 10 <= rss_before * 11;
  std::printf("keyd_rss_within_10pct=%s\n", rss_within_10pct ? "yes" : "no");
  constexpr long kRssSlackKib = 8 * 1024;
  bool ok = good.errors == 0 && !good.latencies_ms.empty() && fds_after <= fds_before &&
            (rss_within_10pct || rss_after - rss_before <= kRssSlackKib);
  return ok ? 0 : 1;
}
