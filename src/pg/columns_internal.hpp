// What the files behind columns.hpp share among themselves: columns.cpp (the
// typmod, its catalog and the casts), key_privileges.cpp, sealed.cpp (the
// sealed check), write_hooks.cpp (planner, utility and executor hooks) and
// ddl_triggers.cpp (the event triggers). Private to them, and Postgres-side:
// it uses server types, so include it after postgres.h and never from a
// Postgres-free file.
#pragma once
#ifndef POSTGRES_H
#error "pg/columns_internal.hpp needs postgres.h (in extern \"C\") included first"
#endif
#include <type_traits>

#include "core/bytes.hpp"

struct CreateTableAsStmt;
struct IntoClause;

namespace colcrypt::pg {

inline ByteView bytes_of(const struct varlena* v) {
  return ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

// ---------------------------------------------------------------- columns.cpp

// The schema colcrypt (InvalidOid when missing_ok and it does not exist).
Oid colcrypt_namespace(bool missing_ok);
// The OID of the catalog colcrypt.<name>; raises 42P01 when it is missing.
Oid catalog_relid(const char* name);

void run_as_catalog_owner(Oid relid, void (*body)(void*), void* context);

// Runs body (which uses SPI) as the owner of the catalog relid, with
// search_path = pg_catalog, pg_temp. Restores both on success and on error.
template <typename Body>
void as_catalog_owner(Oid relid, Body&& body) {
  using Callable = std::remove_reference_t<Body>;
  run_as_catalog_owner(
      relid, [](void* context) { (*static_cast<Callable*>(context))(); }, &body);
}

// ---------------------------------------------------------------- sealed.cpp

// The type colcrypt.encrypted and colcrypt.require_sealed(); false when the
// extension is not installed in this database.
bool guard_functions(Oid& type, Oid& check);
// The function colcrypt.sealed(anyelement); InvalidOid without the extension.
Oid sealed_function();
// True when values of typid can hold a colcrypt.encrypted (type).
bool holds_encrypted(Oid typid, Oid type);
// Raises unless every colcrypt.encrypted inside value (of type typid) is sealed.
void check_sealed(Datum value, Oid typid, Oid type);
// True while add_sealed_checks validates the rows its statement wrote.
extern bool validating_new_rows;
// What colcrypt.sealed() checks of a value about to be stored.
void check_stored(Datum datum, Oid argtype, Oid type, bool direct);
// colcrypt_sealed_<column>, clipped to NAMEDATALEN - 1 bytes.
void sealed_check_name(char (&name)[NAMEDATALEN], const char* column);

// ---------------------------------------------------------------- write_hooks.cpp
//
// The frame of a statement that makes a relation from a query, which tells
// ddl_end whether the statement's receiver checked every row it stored.

enum class FrameKind {
  Table,    // CREATE TABLE AS / SELECT INTO / ... AS EXECUTE storing rows
  Explain,  // EXPLAIN [ANALYZE] CREATE TABLE AS / SELECT INTO
  Other,    // WITH NO DATA, CREATE MATERIALIZED VIEW: no change
};

struct TableFrame {
  TableFrame* previous;
  FrameKind kind;
  const IntoClause* into;
  int runs;       // executor runs into a new relation under this frame
  bool complete;  // the one run returned normally: every row was checked
  Oid relid;      // the relation it made
};

// The innermost running statement's frame, or nullptr.
extern TableFrame* current_frame;
// The frame of a statement that began before the library was loaded.
extern TableFrame late_frame;

void begin_late_frame(const CreateTableAsStmt* ctas);
void forget_late_frame();

}  // namespace colcrypt::pg
