// A blocking client for colcrypt-keyd's Unix socket, used by colcrypt-keyctl,
// the tests and the Postgres extension. Postgres-free: the extension passes an
// interrupt check that never longjmps.
#pragma once
#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/wire.hpp"

namespace colcrypt::client {

struct ClientOptions {
  std::string socket_path;
  int timeout_ms = 5000;  // whole exchange: connect, send, receive
  // Called at least every 100 ms while waiting; returning true abandons the
  // exchange with Errc::Cancelled. Must not throw or longjmp.
  std::function<bool()> interrupted;
  // Who must serve the socket, checked with SO_PEERCRED after every connect
  // and before anything is sent (docs/threat-model.md). Set: that uid. Unset:
  // root or this process's effective uid, and from the Client's first
  // connection on, the uid seen then. A mismatch throws UntrustedKeyd.
  std::optional<uid_t> keyd_uid;
};

// The keyd uid a command line names: `text` (--keyd-uid), else
// $COLCRYPT_KEYD_UID, else none. A number is a uid, anything else a user
// name; an invalid uid or unknown user throws InvalidArgument.
std::optional<uid_t> keyd_uid_from(const std::string& text);

// The socket is served by a uid the client does not trust (ClientOptions::
// keyd_uid): nothing was sent. Its code is KeydUnavailable, as for a keyd
// that is not there: the keyd this client may talk to is not reachable.
class UntrustedKeyd : public Error {
 public:
  explicit UntrustedKeyd(const std::string& message) : Error(Errc::KeydUnavailable, message) {}
};

// A Client keeps its connection open between exchanges (keyd closes it after
// its idle timeout; the next exchange then connects again) and closes it when
// destroyed, after any failure, and in a forked child, which never shares its
// parent's connection. A fetch whose kept connection turns out closed by keyd
// before any reply arrived is sent once more on a new connection; an admin
// request always goes on a new connection and is never sent twice. Failures
// throw colcrypt::Error:
//   KeydUnavailable (cannot connect; message names the socket path; or
//   UntrustedKeyd: the socket is served by a uid not trusted),
//   KeydTimeout, Cancelled, ProtocolError,
//   and the mapping of keyd's Failure replies:
//   NotFound -> KeyNotFound, Denied -> PermissionDenied,
//   KeyUnavailable -> KeyUnavailable, AlreadyExists -> AlreadyExists,
//   BadRequest -> InvalidArgument, Internal -> Internal.
class Client {
 public:
  explicit Client(ClientOptions options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // New options for later exchanges; the connection (and the uid learnt at the
  // first one) is kept if the socket path and keyd_uid are the same.
  void set_options(ClientOptions options);
  // Closes the kept connection (the next exchange connects again).
  void disconnect() noexcept;

  // The primary version, one encryption charged. purpose File (colcrypt-file)
  // makes keyd audit the fetch as a file's (FetchPrimaryFor).
  wire::KeyReply fetch_primary(std::string_view name,
                               wire::FetchPurpose purpose = wire::FetchPurpose::Decrypt);
  // purpose other than Decrypt tells keyd the version keys deterministic
  // values or blind indexes (FetchVersionFor; keyd records it), or opens or
  // wraps a file's data key (File; audited, nothing recorded).
  wire::KeyReply fetch_version(const KeyId& id, uint32_t version,
                               wire::FetchPurpose purpose = wire::FetchPurpose::Decrypt);
  // The primary version with a block of up to `wanted` encryptions charged
  // to it by keyd (the caller must not encrypt more than reply.granted values).
  wire::KeyGrantReply fetch_primary_block(std::string_view name, uint32_t wanted);
  // Sends a JSON admin request, returns keyd's JSON reply text.
  std::string admin(std::string_view json_request);
  // Reports a key use the extension denied to a role (keyd logs it).
  void report_denial(const wire::DenialReport& report);

 private:
  enum class Retry { OnStaleConnection, Never };
  wire::Frame exchange(const std::vector<uint8_t>& request, Retry retry);
  void check_peer(int fd);
  ClientOptions options_;
  std::optional<uid_t> first_uid_;  // the server's uid at the first connection
  int fd_ = -1;                     // the kept connection, or -1
  pid_t pid_ = 0;                   // the process that opened fd_
};

}  // namespace colcrypt::client
