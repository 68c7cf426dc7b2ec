// Module initialisation: GUCs, the key cache's exit and transaction-end
// callbacks, and the mapping of C++ failures to Postgres errors.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"
}
// clang-format on

#include "pg/module.hpp"

#include <pwd.h>
#include <sys/un.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/wire.hpp"
#include "pg/columns.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/pending.hpp"

extern "C" {
PG_MODULE_MAGIC;
void _PG_init(void);
}

namespace {

char* keyd_socket_guc = nullptr;
char* keyd_uid_guc = nullptr;
int64_t keyd_uid = -1;  // colcrypt.keyd_uid resolved; -1: unset
int key_cache_ttl_guc = 60;
int keyd_timeout_guc = 5000;

// The pid that registered the exit callback: a backend forked from a postmaster
// that preloaded the library inherits the variable but not the callback.
int exit_callback_pid = 0;

bool check_keyd_socket(char** newval, void** extra, GucSource source) {
  const char* path = *newval;
  if (path == nullptr || path[0] == '\0') {
    GUC_check_errdetail("colcrypt.keyd_socket must name colcrypt-keyd's socket.");
    return false;
  }
  constexpr size_t kPathCapacity = sizeof(sockaddr_un::sun_path);
  if (std::strlen(path) >= kPathCapacity) {
    GUC_check_errdetail("A Unix socket path is at most %d bytes long.",
                        static_cast<int>(kPathCapacity - 1));
    return false;
  }
  return true;
}

// colcrypt.keyd_uid: empty, a uid, or the name of a user (resolved now, so
// that a typo fails the SET, not every later fetch).
bool check_keyd_uid(char** newval, void** extra, GucSource source) {
  const char* value = *newval != nullptr ? *newval : "";
  int64_t uid = -1;
  if (value[0] != '\0') {
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(value, &end, 10);
    if (value[0] >= '0' && value[0] <= '9' && *end == '\0') {
      if (errno != 0 || n >= static_cast<unsigned long long>(static_cast<uid_t>(-1))) {
        GUC_check_errdetail("\"%s\" is not a valid uid.", value);
        return false;
      }
      uid = static_cast<int64_t>(n);
    } else {
      struct passwd entry;
      struct passwd* found = nullptr;
      char buffer[4096];
      if (getpwnam_r(value, &entry, buffer, sizeof buffer, &found) != 0 || found == nullptr) {
        GUC_check_errdetail(
            "There is no user \"%s\"; give the uid or the user name colcrypt-keyd "
            "runs as.",
            value);
        return false;
      }
      uid = static_cast<int64_t>(found->pw_uid);
    }
  }
  // PG 15 frees a GUC extra with free(): malloc it.
  int64_t* resolved = static_cast<int64_t*>(malloc(sizeof(int64_t)));
  if (resolved == nullptr) return false;
  *resolved = uid;
  *extra = resolved;
  return true;
}

void assign_keyd_uid(const char* newval, void* extra) { keyd_uid = *static_cast<int64_t*>(extra); }

// Read by the keyd client at least every 100 ms while it waits. Only reads the
// flags: the interrupt itself is serviced (CHECK_FOR_INTERRUPTS) after the C++
// part has unwound.
bool interrupt_requested() { return InterruptPending && (QueryCancelPending || ProcDiePending); }

// pg_stat_activity shows wait_event_type "Extension" while keyd is asked.
void keyd_wait_start() { pgstat_report_wait_start(PG_WAIT_EXTENSION); }
void keyd_wait_end() { pgstat_report_wait_end(); }

void wipe_keys_at_exit(int code, Datum arg) {
  colcrypt::pg::clear_key_cache();
  colcrypt::pg::clear_pending_key();
}

void evict_keys_at_transaction_end(XactEvent event, void* arg) {
  switch (event) {
    case XACT_EVENT_COMMIT:
    case XACT_EVENT_ABORT:
    case XACT_EVENT_PARALLEL_COMMIT:
    case XACT_EVENT_PARALLEL_ABORT:
      colcrypt::pg::evict_expired_keys(key_cache_ttl_guc);
      colcrypt::pg::end_transaction_privileges(event == XACT_EVENT_COMMIT ||
                                               event == XACT_EVENT_PARALLEL_COMMIT);
      break;
    default:
      break;
  }
}

int sqlstate_for(colcrypt::Errc code) {
  using colcrypt::Errc;
  switch (code) {
    case Errc::InvalidArgument:
      return ERRCODE_INVALID_PARAMETER_VALUE;
    case Errc::MalformedValue:
      return ERRCODE_DATA_CORRUPTED;
    case Errc::DecryptionFailed:
      return ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION;
    case Errc::KeyNotFound:
      return ERRCODE_UNDEFINED_OBJECT;
    case Errc::KeyUnavailable:
      return ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
    case Errc::PermissionDenied:
      return ERRCODE_INSUFFICIENT_PRIVILEGE;
    // keyd is outside Postgres: class 58. Class 08 would tell drivers and
    // poolers that the client connection broke, and they would drop it.
    case Errc::KeydUnavailable:
      return ERRCODE_SYSTEM_ERROR;
    case Errc::KeydTimeout:
    case Errc::ProtocolError:
      return ERRCODE_IO_ERROR;
    case Errc::Cancelled:
      return ERRCODE_QUERY_CANCELED;
    default:
      return ERRCODE_INTERNAL_ERROR;
  }
}

}  // namespace

void _PG_init(void) {
  DefineCustomStringVariable("colcrypt.keyd_socket", "Path of colcrypt-keyd's Unix socket.",
                             "Every backend and parallel worker fetches its keys from this socket.",
                             &keyd_socket_guc, "/run/colcrypt/keyd.sock", PGC_SUSET, 0,
                             check_keyd_socket, nullptr, nullptr);
  DefineCustomStringVariable(
      "colcrypt.keyd_uid", "The uid (or user name) colcrypt-keyd runs as.",
      "The server on colcrypt.keyd_socket must run as this uid, or nothing is asked of it. "
      "Empty: root or the database server's own uid, and in each backend the uid seen at its "
      "first connection.",
      &keyd_uid_guc, "", PGC_SUSET, 0, check_keyd_uid, assign_keyd_uid, nullptr);
  // The maximum is also colcrypt-keyd's default --retire-grace-seconds
  // (docs/rotation.md): keep them one constant.
  DefineCustomIntVariable("colcrypt.key_cache_ttl",
                          "How long a backend keeps a key it fetched from colcrypt-keyd.",
                          "0 keeps no key past the call that fetched it (one keyd request per "
                          "call). A rotated key becomes primary for encryption within this time.",
                          &key_cache_ttl_guc, 60, 0, colcrypt::wire::kMaxKeyCacheTtlSeconds,
                          PGC_SUSET, GUC_UNIT_S, nullptr, nullptr, nullptr);
  DefineCustomIntVariable("colcrypt.keyd_timeout",
                          "Time limit for one request to colcrypt-keyd (connect, send, receive).",
                          nullptr, &keyd_timeout_guc, 5000, 1, 3600000, PGC_SUSET, GUC_UNIT_MS,
                          nullptr, nullptr, nullptr);
  MarkGUCPrefixReserved("colcrypt");
  RegisterXactCallback(evict_keys_at_transaction_end, nullptr);
  colcrypt::pg::install_column_hooks();
}

namespace colcrypt::pg {

void check_sealable_size(size_t plaintext_size) {
  // Largest envelope whose text form, plus its terminating NUL, fits a palloc.
  constexpr size_t kMaxEnvelope = (MaxAllocSize - 1 - colcrypt::kTextPrefix.size()) / 4 * 3;
  constexpr size_t kMaxPlaintext = kMaxEnvelope - colcrypt::kEnvelopeOverhead;
  if (plaintext_size > kMaxPlaintext)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("value too large to encrypt"),
                    errdetail("The plaintext has %zu bytes; colcrypt encrypts at most %zu, so that "
                              "the value's text form (used by pg_dump and COPY) stays under 1 GB.",
                              plaintext_size, kMaxPlaintext)));
}

KeydSettings prepare_key_access() {
  if (exit_callback_pid != MyProcPid) {
    on_proc_exit(wipe_keys_at_exit, 0);
    exit_callback_pid = MyProcPid;
  }
  KeydSettings settings;
  settings.socket_path = keyd_socket_guc;
  settings.timeout_ms = keyd_timeout_guc;
  settings.cache_ttl_s = key_cache_ttl_guc;
  settings.keyd_uid = keyd_uid;
  settings.interrupted = interrupt_requested;
  settings.wait_start = keyd_wait_start;
  settings.wait_end = keyd_wait_end;
  return settings;
}

void raise_failure(const GuardedFailure& f, ValueOrigin origin) {
  if (f.out_of_memory)
    ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory"),
                    errdetail("colcrypt could not allocate memory outside Postgres' allocator.")));

  switch (f.code) {
    case Errc::MalformedValue:
      switch (origin) {
        case ValueOrigin::TextInput:
          ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
                          errmsg("invalid input syntax for type colcrypt.encrypted"),
                          errdetail("%s", f.message)));
          break;
        case ValueOrigin::BinaryInput:
          ereport(ERROR, (errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
                          errmsg("invalid binary value for type colcrypt.encrypted"),
                          errdetail("%s", f.message)));
          break;
        case ValueOrigin::Stored:
          ereport(ERROR,
                  (errcode(ERRCODE_DATA_CORRUPTED), errmsg("malformed colcrypt.encrypted value"),
                   errdetail("%s", f.message)));
          break;
      }
      break;
    case Errc::DecryptionFailed:
      // One message for every authentication failure: no oracle.
      ereport(ERROR,
              (errcode(ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION), errmsg("decryption failed"),
               errdetail("Wrong key, wrong context, or the value was altered.")));
      break;
    case Errc::Cancelled:
      // The keyd client gave up because a cancel or termination is pending:
      // now that the C++ part has unwound, let Postgres service it (statement
      // timeout, pg_cancel_backend, pg_terminate_backend).
      CHECK_FOR_INTERRUPTS();
      ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
                      errmsg("canceling statement while waiting for colcrypt-keyd")));
      break;
    default:
      break;
  }
  ereport(ERROR, (errcode(sqlstate_for(f.code)), errmsg("%s", f.message),
                  f.detail[0] != '\0' ? errdetail("%s", f.detail) : 0,
                  f.hint[0] != '\0' ? errhint("%s", f.hint) : 0));
  pg_unreachable();
}

}  // namespace colcrypt::pg
