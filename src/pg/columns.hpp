// Key-bound columns (colcrypt.encrypted('key_name')), per-role key privileges
// and the checks that keep plaintext out of columns. docs/columns.md explains
// the design. Postgres-free declarations; the functions are Postgres-side and
// ereport, so call them outside guarded() parts.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/bytes.hpp"

struct varlena;

namespace colcrypt::pg {

// A key-bound column's type modifier resolved through colcrypt.column_keys.
struct ColumnKey {
  int32_t typmod;
  char key_name[64];
  char binding[64];
  char context[96];  // the AAD context of the column's values: "colcrypt.column:" + binding
  size_t context_size;
};

// The entry of a typmod (>= 0); ereports when colcrypt.column_keys has none.
const ColumnKey& column_key(int32_t typmod);

enum class KeyPrivilege { Encrypt, Decrypt, BlindIndex };

// Raises 42501 unless the current user is a superuser or has the privilege on
// the key through colcrypt.key_grants (directly or through a role it inherits).
void check_key_privilege(const char* key_name, size_t key_name_size, KeyPrivilege privilege);

// Forgets the cached privileges (grant_key / revoke_key).
void reset_key_privileges();
// At transaction end: an abort forgets the cached privileges; a commit keeps
// them unless one was read in parallel mode (from the transaction's snapshot).
// Otherwise they live until colcrypt.key_grants or a role changes (key_privileges.cpp).
void end_transaction_privileges(bool committed);

// Raises 22P02 when the bytes are a pending plaintext (pending.hpp): nothing
// but the typmod coercion may consume one.
void reject_pending(ByteView value);

// The rule that tells a sealed value from a plaintext on text input: after
// optional leading whitespace, a "colcrypt:" prefix in any letter case claims
// a sealed value, which must then parse strictly; anything else is plaintext.
bool claims_sealed(const char* text, size_t size);

// Decodes and validates the text form of a sealed value (22P02 when it does
// not parse). Implemented in type_io.cpp.
struct varlena* parse_sealed_text(const char* text, size_t size);

// Seals a plaintext under the column's key and binding (checks the encrypt
// privilege). Returns a new varlena holding the envelope.
struct varlena* seal_for_column(int32_t typmod, ByteView plaintext);

// Checks that a sealed value may be stored in the column: the encrypt
// privilege, the column's key, and authentication with the column's binding.
void verify_for_column(int32_t typmod, ByteView envelope);

// True while a COPY FROM runs (the portal's, or one run by a function or DO
// block): its input functions get the column's real typmod, so -1 means a
// column without a key.
bool in_copy_from();

// Installs the planner hook (require_sealed around values stored in columns
// without a key, and around the output of CREATE TABLE AS / materialized
// views), the utility hook (marks COPY FROM and CREATE TABLE AS while they
// run) and the executor-run hook (CREATE TABLE AS checks each row as it
// stores it, so its sealed checks need no validation scan; EXPLAIN ANALYZE
// of one is refused). Called once from _PG_init. The sealed CHECK constraints
// (event trigger colcrypt._ddl_end) are the backstop that needs no loaded
// library.
void install_column_hooks();

}  // namespace colcrypt::pg
