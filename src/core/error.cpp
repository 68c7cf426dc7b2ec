#include "core/error.hpp"

namespace colcrypt {

const char* errc_name(Errc code) {
  switch (code) {
    case Errc::InvalidArgument:
      return "invalid argument";
    case Errc::MalformedValue:
      return "malformed value";
    case Errc::DecryptionFailed:
      return "decryption failed";
    case Errc::CryptoFailure:
      return "crypto failure";
    case Errc::KeyNotFound:
      return "key not found";
    case Errc::KeyUnavailable:
      return "key unavailable";
    case Errc::PermissionDenied:
      return "permission denied";
    case Errc::KeydUnavailable:
      return "keyd unavailable";
    case Errc::KeydTimeout:
      return "keyd timeout";
    case Errc::Cancelled:
      return "cancelled";
    case Errc::ProtocolError:
      return "protocol error";
    case Errc::AlreadyExists:
      return "already exists";
    case Errc::StoreCorrupt:
      return "store corrupt";
    case Errc::WrongMasterKey:
      return "wrong master key";
    case Errc::InsecurePermissions:
      return "insecure permissions";
    case Errc::Io:
      return "I/O error";
    case Errc::Internal:
      return "internal error";
  }
  return "unknown error";
}

}  // namespace colcrypt
