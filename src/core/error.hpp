// The one exception type of colcrypt's C++ code. Messages name keys and paths,
// never key bytes or plaintext: they end up in logs and in SQL errors.
#pragma once
#include <stdexcept>
#include <string>

namespace colcrypt {

enum class Errc {
  InvalidArgument,      // caller passed something unusable (bad key name, bad size)
  MalformedValue,       // an envelope / text form / frame that does not parse
  DecryptionFailed,     // authentication failed: wrong key, wrong context, tampered
  CryptoFailure,        // OpenSSL itself failed (should not happen)
  KeyNotFound,          // keyd has no such key or version
  KeyUnavailable,       // key exists but its state forbids the use (disabled, destroyed)
  PermissionDenied,     // keyd refused the peer or the operation
  KeydUnavailable,      // cannot connect to keyd
  KeydTimeout,          // keyd did not answer in time
  Cancelled,            // the caller's interrupt check asked to stop
  ProtocolError,        // peer broke the wire protocol
  AlreadyExists,        // create of an existing key
  StoreCorrupt,         // key store fails to parse or its MAC does not verify
  WrongMasterKey,       // KEK check failed
  InsecurePermissions,  // store or directory readable by others
  Io,                   // file or socket I/O failed
  Internal,
};

const char* errc_name(Errc code);

class Error : public std::runtime_error {
 public:
  Error(Errc code, const std::string& message) : std::runtime_error(message), code_(code) {}
  Errc code() const { return code_; }

 private:
  Errc code_;
};

}  // namespace colcrypt
