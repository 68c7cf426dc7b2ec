// Per-role key privileges (colcrypt.key_grants): the check every function
// that uses a key makes, and the per-backend cache of its answers with what
// invalidates it. docs/columns.md describes the grants.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "pg/columns.hpp"
#include "pg/columns_internal.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/module.hpp"

using colcrypt::pg::as_catalog_owner;
using colcrypt::pg::catalog_relid;
using colcrypt::pg::guarded;
using colcrypt::pg::KeyPrivilege;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_reset_privilege_cache);
PG_FUNCTION_INFO_V1(colcrypt_key_grants_changed);
}

namespace {

struct PrivilegeEntry {
  Oid user;
  KeyPrivilege privilege;
  bool allowed;
  char key_name[64];
};
constexpr int kPrivilegeCacheSize = 32;
PrivilegeEntry privilege_cache[kPrivilegeCacheSize];
int privilege_cache_used = 0;

// The cache lives until a grant or a role changes, not for one transaction: a
// lookup costs a catalog query, which per transaction made point reads by
// non-superusers about 2x slower (bench/ANALYSIS.md). What invalidates it:
// - colcrypt.key_grants changes: its statement trigger (colcrypt_key_grants_changed)
//   sends a relcache invalidation of the table, which every backend receives
//   (its own at the next command, others at their next transaction or lock);
// - role membership or role attributes change: syscache invalidations of
//   pg_auth_members and pg_authid, sent by Postgres itself;
// - an abort (module.cpp), and a reset of the whole relcache.
// privilege_generation counts invalidations: a lookup whose query ran while
// one arrived is used once but not cached, so an entry is never older than
// the last invalidation it could have missed.
uint64 privilege_generation = 0;
Oid key_grants_relid = InvalidOid;  // learnt at the first lookup
bool privilege_callbacks_registered = false;
bool privileges_for_transaction = false;  // an entry came from the transaction's snapshot

// The last check that passed: a bulk load or a scan asks the same question
// for every row, and this answers it with one compare, before even the name's
// validation (a name equal to one that passed is valid). Dropped with the
// cache: any invalidation moves privilege_generation.
struct LastAllowed {
  Oid user = InvalidOid;
  KeyPrivilege privilege = KeyPrivilege::Encrypt;
  uint64 generation = 0;
  size_t name_size = 0;  // 0: none
  char key_name[64];
};
LastAllowed last_allowed;

void forget_privileges() {
  privilege_cache_used = 0;
  privileges_for_transaction = false;
  ++privilege_generation;
}

void privileges_relcache_callback(Datum, Oid relid) {
  if (relid == InvalidOid || relid == key_grants_relid || key_grants_relid == InvalidOid)
    forget_privileges();
}

void privileges_syscache_callback(Datum, int, uint32) { forget_privileges(); }

const char* privilege_name(KeyPrivilege p) {
  switch (p) {
    case KeyPrivilege::Encrypt:
      return "encrypt";
    case KeyPrivilege::Decrypt:
      return "decrypt";
    case KeyPrivilege::BlindIndex:
      return "blind_index";
  }
  return "?";
}

// Any number of grantee rows, and any depth of membership, in one query. A
// row counts only while its role still has the name it was granted under
// (role_name): roles are cluster-wide and Postgres records no dependency of
// this catalog on them, so after DROP ROLE a new role may receive the same
// OID, and it must not inherit the dropped role's grants.
bool lookup_privilege(Oid user, const char* key, KeyPrivilege privilege) {
  bool allowed = false;
  key_grants_relid = catalog_relid("key_grants");
  as_catalog_owner(key_grants_relid, [&] {
    Oid types[3] = {TEXTOID, TEXTOID, OIDOID};
    Datum values[3] = {CStringGetTextDatum(key), CStringGetTextDatum(privilege_name(privilege)),
                       ObjectIdGetDatum(user)};
    SPIPlanPtr plan = SPI_prepare(
        "SELECT 1 FROM colcrypt.key_grants g "
        "JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) g.role::pg_catalog.oid "
        "AND a.rolname OPERATOR(pg_catalog.=) g.role_name "
        "WHERE g.key_name OPERATOR(pg_catalog.=) $1 "
        "AND g.privilege OPERATOR(pg_catalog.=) $2 "
        "AND pg_catalog.pg_has_role($3, a.oid, 'USAGE') LIMIT 1",
        3, types);
    if (plan == nullptr) elog(ERROR, "SPI_prepare failed");
    // The latest committed grants, not the transaction's snapshot: the result
    // is cached past this transaction (see privilege_generation). Parallel
    // mode cannot take a new snapshot: there the transaction's is used and
    // the cache is dropped when the transaction ends.
    const bool parallel = IsInParallelMode();
    if (parallel) privileges_for_transaction = true;
    Snapshot snapshot = parallel ? GetActiveSnapshot() : GetLatestSnapshot();
    if (SPI_execute_snapshot(plan, values, nullptr, snapshot, InvalidSnapshot, true, false, 1) !=
        SPI_OK_SELECT)
      elog(ERROR, "SPI_execute_snapshot failed");
    allowed = SPI_processed > 0;
  });
  return allowed;
}

void register_privilege_callbacks() {
  if (privilege_callbacks_registered) return;
  CacheRegisterRelcacheCallback(privileges_relcache_callback, 0);
  CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, privileges_syscache_callback, 0);
  CacheRegisterSyscacheCallback(AUTHOID, privileges_syscache_callback, 0);
  privilege_callbacks_registered = true;
}

bool same_as_last_allowed(const char* key_name, size_t key_name_size, KeyPrivilege privilege) {
  const LastAllowed& last = last_allowed;
  return last.name_size != 0 && last.name_size == key_name_size && last.privilege == privilege &&
         last.generation == privilege_generation && last.user == GetUserId() &&
         std::memcmp(last.key_name, key_name, key_name_size) == 0;
}

// Only after the check passed, with a valid name (at most 63 bytes).
// generation: privilege_generation when the check began; an answer found
// while an invalidation arrived is not remembered (as the cache does).
void remember_allowed(Oid user, const char* key_name, size_t key_name_size,
                      KeyPrivilege privilege, uint64 generation) {
  // Nor while the answer came from the transaction's snapshot (parallel
  // mode): the cache keeps such entries only until the transaction ends.
  if (generation != privilege_generation || privileges_for_transaction) return;
  last_allowed.user = user;
  last_allowed.privilege = privilege;
  last_allowed.generation = privilege_generation;
  std::memcpy(last_allowed.key_name, key_name, key_name_size);
  last_allowed.name_size = key_name_size;
}

}  // namespace

namespace colcrypt::pg {

void check_key_privilege(const char* key_name, size_t key_name_size, KeyPrivilege privilege) {
  if (same_as_last_allowed(key_name, key_name_size, privilege)) return;
  // First, and without echoing it: a "name" that is not one may be a
  // plaintext passed in the wrong argument, and the denial below would put
  // it into the error, the server log and keyd's audit log.
  bool valid = false;
  guarded(ValueOrigin::Stored,
          [&] { valid = valid_key_name(std::string_view(key_name, key_name_size)); });
  if (!valid)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt key name"),
                    errdetail("Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' "
                              "and '-', and do not start with '.' or '-'.")));
  // The callbacks first: remember_allowed() relies on them to move the
  // generation when a role (its superuser attribute too) or a grant changes.
  register_privilege_callbacks();
  const Oid user = GetUserId();
  // An answer is remembered only when no invalidation arrived while it was
  // found (a catalog lookup may process them): it could predate a change.
  const uint64 generation = privilege_generation;
  if (superuser()) {
    remember_allowed(user, key_name, key_name_size, privilege, generation);
    return;
  }
  char key[64];
  std::memcpy(key, key_name, key_name_size);  // valid: at most 63 bytes
  key[key_name_size] = '\0';
  bool allowed = false;
  bool cached = false;
  for (int i = 0; i < privilege_cache_used; ++i) {
    const PrivilegeEntry& e = privilege_cache[i];
    if (e.user == user && e.privilege == privilege && std::strcmp(e.key_name, key) == 0) {
      allowed = e.allowed;
      cached = true;
      break;
    }
  }
  if (!cached) {
    allowed = lookup_privilege(user, key, privilege);
    if (generation == privilege_generation && privilege_cache_used < kPrivilegeCacheSize) {
      PrivilegeEntry& e = privilege_cache[privilege_cache_used++];
      e.user = user;
      e.privilege = privilege;
      e.allowed = allowed;
      strlcpy(e.key_name, key, sizeof e.key_name);
    }
  }
  if (allowed) remember_allowed(user, key_name, key_name_size, privilege, generation);
  if (!allowed) {
    const char* role = GetUserNameFromId(user, false);
    const KeydSettings settings = prepare_key_access();
    const char* database = get_database_name(MyDatabaseId);
    report_denial(settings, key, privilege_name(privilege), role,
                  database != nullptr ? database : "");
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to %s with colcrypt key \"%s\"",
                           privilege == KeyPrivilege::BlindIndex ? "compute blind indexes"
                                                                 : privilege_name(privilege),
                           key),
                    errdetail("Role \"%s\" has no %s privilege on the key.", role,
                              privilege_name(privilege)),
                    errhint("A superuser grants it with colcrypt.grant_key('%s', '%s', '%s').", key,
                            role, privilege_name(privilege))));
  }
}

void reset_key_privileges() { forget_privileges(); }

void end_transaction_privileges(bool committed) {
  if (!committed || privileges_for_transaction) forget_privileges();
}

}  // namespace colcrypt::pg

// reset_privilege_cache(): called by grant_key / revoke_key.
Datum colcrypt_reset_privilege_cache(PG_FUNCTION_ARGS) {
  colcrypt::pg::reset_key_privileges();
  PG_RETURN_VOID();
}

// _key_grants_changed(): statement trigger on colcrypt.key_grants. Every
// backend (this one included) forgets its cached privileges when the change
// commits; this backend at its next command already.
Datum colcrypt_key_grants_changed(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_TRIGGER(fcinfo)) elog(ERROR, "colcrypt._key_grants_changed is a trigger");
  CacheInvalidateRelcache(reinterpret_cast<TriggerData*>(fcinfo->context)->tg_relation);
  return PointerGetDatum(nullptr);
}
