// colcrypt-file: encrypts files and streams with keys from colcrypt-keyd, in
// the streaming format of docs/format.md ("Files"); rewrap moves a file to
// its key's current version by rewriting the header only.
// Exit codes (kExit* below; also in --help and docs/operations.md).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "client/client.hpp"
#include "core/error.hpp"
#include "core/stream.hpp"
#include "file/file_io.hpp"

namespace {

using colcrypt::Errc;
using colcrypt::stream::StreamErrc;
namespace stream = colcrypt::stream;
namespace wire = colcrypt::wire;

constexpr int kExitOk = 0;
constexpr int kExitOther = 1;            // anything not below (an internal error)
constexpr int kExitUsage = 2;            // bad arguments
constexpr int kExitKeydUnavailable = 3;  // cannot reach keyd, or it did not answer
constexpr int kExitKeyRefused = 4;       // key or version not found, disabled, destroyed, denied
constexpr int kExitHeaderAuth = 5;  // the data key does not unwrap: wrong context, altered header
constexpr int kExitTampered = 6;    // a chunk does not verify, or data follows the last
constexpr int kExitTruncated = 7;   // the input ends before its last chunk
constexpr int kExitIo = 8;          // reading IN or writing OUT failed
constexpr int kExitNotAFile = 9;    // not a colcrypt-file file, or a later format version
constexpr int kExitInterrupted = 130;  // SIGINT / SIGTERM / SIGHUP

constexpr const char* kDefaultSocket = "/run/colcrypt/keyd.sock";

constexpr const char* kFooter = R"(Exit codes:
  0  success
  1  internal error
  2  usage error
  3  colcrypt-keyd unreachable or not answering (--socket, $COLCRYPT_KEYD_SOCKET)
  4  key refused by keyd: no such key or version, disabled, destroyed (crypto-shredded), denied
  5  header does not authenticate: wrong --context, or the header was altered
  6  content tampered: a chunk altered, reordered, duplicated, dropped or from another file,
     or data appended after the last chunk
  7  truncated: the input ends before its last chunk
  8  I/O error reading IN or writing OUT (disk full, broken pipe, ...)
  9  not a colcrypt-file file, or a format version this build does not know
130  interrupted
A named OUT is written to a temporary file and renamed over OUT only when the
last chunk verified: on any failure OUT is left as it was. With OUT "-"
(standard output) plaintext is written as each chunk verifies: after a non-zero
exit, discard everything written. Format and rotation: docs/format.md,
docs/rotation.md.)";

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "colcrypt-file: error: %s\n", message.c_str());
  return code;
}

int exit_code_of(const colcrypt::Error& e) {
  if (const auto* s = dynamic_cast<const stream::StreamError*>(&e)) {
    switch (s->reason()) {
      case StreamErrc::NotAStream:
      case StreamErrc::UnsupportedVersion:
      case StreamErrc::MalformedHeader:
        return kExitNotAFile;
      case StreamErrc::HeaderAuthFailed:
        return kExitHeaderAuth;
      case StreamErrc::ChunkAuthFailed:
      case StreamErrc::TrailingData:
        return kExitTampered;
      case StreamErrc::Truncated:
        return kExitTruncated;
    }
  }
  switch (e.code()) {
    case Errc::KeydUnavailable:
    case Errc::KeydTimeout:
    case Errc::ProtocolError:
      return kExitKeydUnavailable;
    case Errc::KeyNotFound:
    case Errc::KeyUnavailable:
    case Errc::PermissionDenied:
      return kExitKeyRefused;
    case Errc::Io:
      return kExitIo;
    case Errc::Cancelled:
      return kExitInterrupted;
    default:
      return kExitOther;
  }
}

std::string human_bytes(double n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (n >= 1024 && u < 4) {
    n /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", n, units[u]);
  return buf;
}

// A one-line progress display on stderr: bytes, rate and, when the input's
// size is known, a bar, percent and ETA. Redrawn at most 5 times a second.
class ProgressBar {
 public:
  ProgressBar(bool enabled, std::optional<uint64_t> total) : enabled_(enabled), total_(total) {}
  ~ProgressBar() {
    if (drawn_) std::fputc('\n', stderr);
  }
  void update(uint64_t done, bool force = false) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;
    std::string line = "\r";
    if (total_ && *total_ > 0) {
      const double fraction = std::min(1.0, static_cast<double>(done) / *total_);
      const int width = 24, filled = static_cast<int>(fraction * width);
      line += "[" + std::string(filled, '#') + std::string(width - filled, '.') + "] ";
      char pct[16];
      std::snprintf(pct, sizeof pct, "%3.0f%% ", fraction * 100);
      line += pct + human_bytes(done) + " / " + human_bytes(*total_);
    } else {
      line += human_bytes(done);
    }
    line += "  " + human_bytes(rate) + "/s";
    if (total_ && rate > 0 && done < *total_) {
      const auto eta = static_cast<long>((*total_ - done) / rate);
      char buf[32];
      std::snprintf(buf, sizeof buf, "  ETA %ld:%02ld", eta / 60, eta % 60);
      line += buf;
    }
    line += "    ";
    std::fputs(line.c_str(), stderr);
    std::fflush(stderr);
    drawn_ = true;
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_;
  std::optional<uint64_t> total_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_{};
  bool drawn_ = false;
};

colcrypt::ByteView context_view(const std::string& context) {
  return colcrypt::ByteView::of(context);
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket;
  int timeout_ms = 5000;
  bool quiet = false;
  std::string key_name, context, in_path, out_path;
  uint32_t chunk_size = stream::kDefaultChunkSize;

  CLI::App app{"colcrypt-file: encrypt files and streams with keys from colcrypt-keyd",
               "colcrypt-file"};
  app.footer(kFooter);
  app.add_option("--socket", socket,
                 std::string("colcrypt-keyd socket (default: $COLCRYPT_KEYD_SOCKET, else ") +
                     kDefaultSocket + ")");
  std::string keyd_uid;
  app.add_option("--keyd-uid", keyd_uid,
                 "uid or user name colcrypt-keyd runs as; a socket served by any other is "
                 "refused (default: $COLCRYPT_KEYD_UID, else root or this process's uid)");
  app.add_option("--timeout-ms", timeout_ms, "how long to wait for keyd (default 5000)")
      ->check(CLI::Range(1, 3600 * 1000));
  app.add_flag("-q,--quiet", quiet, "no progress display (it is shown only on a terminal)");
  app.require_subcommand(1);

  auto* encrypt = app.add_subcommand(
      "encrypt", "encrypt IN (a file, or - for standard input) into OUT (a file, or -)");
  encrypt->add_option("--key", key_name, "name of the colcrypt-keyd key")->required();
  encrypt->add_option("--context", context,
                      "context bound to the file (AAD): decrypt and rewrap need the same");
  encrypt->add_option("--chunk-size", chunk_size, "plaintext bytes per chunk (default 65536)")
      ->check(CLI::Range(stream::kMinChunkSize, stream::kMaxChunkSize));
  encrypt->add_option("IN", in_path, "input file, - for standard input")->required();
  encrypt->add_option("OUT", out_path, "output file, - for standard output")->required();

  auto* decrypt = app.add_subcommand("decrypt", "decrypt IN into OUT (files, or -)");
  decrypt->add_option("--context", context, "the context given at encryption");
  decrypt->add_option("IN", in_path, "input file, - for standard input")->required();
  decrypt->add_option("OUT", out_path, "output file, - for standard output")->required();

  auto* rewrap = app.add_subcommand(
      "rewrap",
      "move IN to its key's current version by rewriting only the header (no re-encryption "
      "of the content); into OUT, or IN itself (atomically) when OUT is omitted");
  rewrap->add_option("--context", context, "the context given at encryption");
  rewrap->add_option("IN", in_path, "input file, - for standard input")->required();
  rewrap->add_option("OUT", out_path, "output file, - for standard output (default: IN)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    app.exit(e);
    return kExitUsage;
  }
  const std::string command = app.get_subcommands().front()->get_name();
  if (command == "rewrap" && out_path.empty()) {
    if (in_path == "-") return fail(kExitUsage, "rewrap of standard input needs OUT");
    out_path = in_path;
  }
  const bool in_place = command == "rewrap" && out_path == in_path;
  if (!in_place && in_path != "-" && out_path != "-" &&
      colcrypt::file::same_file(in_path, out_path))
    return fail(kExitUsage, "IN and OUT are the same file");
  if (socket.empty()) {
    const char* env = std::getenv("COLCRYPT_KEYD_SOCKET");
    socket = env && *env ? env : kDefaultSocket;
  }

  colcrypt::file::install_signal_handlers();
  colcrypt::client::ClientOptions options;
  options.socket_path = socket;
  options.timeout_ms = timeout_ms;
  options.interrupted = [] { return colcrypt::file::g_interrupted != 0; };
  try {
    options.keyd_uid = colcrypt::client::keyd_uid_from(keyd_uid);
  } catch (const colcrypt::Error& e) {
    return fail(kExitUsage, e.what());
  }

  try {
    colcrypt::client::Client client(options);
    colcrypt::file::Input in(in_path);
    const bool show = !quiet && ::isatty(STDERR_FILENO);

    if (command == "encrypt") {
      const wire::KeyReply key = client.fetch_primary(key_name, wire::FetchPurpose::File);
      client.disconnect();
      colcrypt::SecretBytes data_key;
      const stream::FileHeader header = stream::new_header(
          key.key.view(), key.id, key.version, context_view(context), chunk_size, data_key);
      colcrypt::file::Output out(out_path);
      ProgressBar bar(show, in.size());
      uint64_t consumed = 0;
      stream::encrypt(
          header, data_key.view(), [&](uint8_t* b, size_t n) { return in.read(b, n); },
          [&](const uint8_t* d, size_t n) { out.write(d, n); },
          [&](uint64_t done) {
            consumed = done;
            bar.update(done);
          });
      out.commit();
      bar.update(consumed, true);
      return kExitOk;
    }

    if (command == "decrypt") {
      colcrypt::file::Output out(out_path);
      ProgressBar bar(show, in.size());
      uint64_t consumed = 0;
      stream::decrypt([&](uint8_t* b, size_t n) { return in.read(b, n); },
                      [&](const stream::FileHeader& h) {
                        const wire::KeyReply key =
                            client.fetch_version(h.key_id, h.key_version, wire::FetchPurpose::File);
                        client.disconnect();
                        return stream::unwrap_data_key(h, key.key.view(), context_view(context));
                      },
                      [&](const uint8_t* d, size_t n) { out.write(d, n); },
                      [&](uint64_t done) {
                        consumed = done;
                        bar.update(done);
                      });
      out.commit();
      bar.update(consumed, true);
      return kExitOk;
    }

    // rewrap: only the header changes; the chunks are copied as they are.
    std::array<uint8_t, stream::kFileHeaderSize> encoded{};
    size_t have = 0;
    while (have < encoded.size()) {
      const size_t r = in.read(encoded.data() + have, encoded.size() - have);
      if (r == 0) break;
      have += r;
    }
    const stream::FileHeader header =
        stream::parse_file_header(colcrypt::ByteView(encoded.data(), have));
    const wire::KeyReply old_key =
        client.fetch_version(header.key_id, header.key_version, wire::FetchPurpose::File);
    // Check the context, and that OUT can be written as it must be (in place:
    // with IN's owner), before anything is charged to the primary. Keeps IN's
    // mode, in place its owner and group too.
    stream::unwrap_data_key(header, old_key.key.view(), context_view(context));
    colcrypt::file::Output out(out_path, in.mode().value_or(0600),
                               in_place ? in.owner() : std::nullopt);
    const wire::KeyReply primary = client.fetch_primary(old_key.name, wire::FetchPurpose::File);
    client.disconnect();
    if (primary.id != header.key_id) return fail(kExitOther, "keyd answered with another key");
    if (primary.version == header.key_version && in_place) {
      std::fprintf(stderr, "colcrypt-file: %s is already under version %u of key '%s'\n",
                   in.name().c_str(), header.key_version, old_key.name.c_str());
      return kExitOk;
    }
    const stream::FileHeader fresh =
        primary.version == header.key_version
            ? header
            : stream::rewrap_header(header, old_key.key.view(), primary.key.view(), primary.version,
                                    context_view(context));
    const auto fresh_bytes = stream::encode_file_header(fresh);
    if (in.size() && out_path != "-") {
      out.clone_from(in);
      out.pwrite_at(0, fresh_bytes.data(), fresh_bytes.size());
    } else {
      out.write(fresh_bytes.data(), fresh_bytes.size());
      std::vector<uint8_t> buffer(1 << 20);
      for (size_t r; (r = in.read(buffer.data(), buffer.size())) > 0;) out.write(buffer.data(), r);
    }
    out.commit();
    if (!quiet) {
      std::fprintf(stderr, "colcrypt-file: %s: key '%s' version %u -> %u\n", in.name().c_str(),
                   old_key.name.c_str(), header.key_version, primary.version);
    }
    return kExitOk;
  } catch (const colcrypt::Error& e) {
    return fail(exit_code_of(e), e.what());
  } catch (const std::bad_alloc&) {
    return fail(kExitOther, "out of memory");
  }
}
