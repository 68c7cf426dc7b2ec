// Key-bound columns: the type modifier of colcrypt.encrypted('key_name'
// [, 'binding']), the casts that seal plaintext under a column's key, the
// per-role key privileges, and the planner and utility hooks that keep
// pending plaintext out of columns without a key (INSERT/UPDATE/MERGE, CREATE
// TABLE AS and materialized views, COPY FROM at any nesting level, ADD COLUMN
// defaults). docs/columns.md describes the design and what is not covered.
//
// Catalog access (colcrypt.column_keys, colcrypt.key_grants) runs through SPI
// as the catalog's owner with search_path pinned to pg_catalog, so that no
// caller needs privileges on the catalogs and no caller's search_path can
// redirect an operator; the queries qualify every name anyway.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_class.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "nodes/parsenodes.h"
#include "nodes/plannodes.h"
#include "optimizer/planner.h"
#include "parser/parse_func.h"
#include "parser/parsetree.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "commands/dbcommands.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "tcop/pquery.h"
#include "tcop/utility.h"
#include "access/relation.h"
#include "access/tupdesc_details.h"
#include "utils/syscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include "pg/columns.hpp"

#include <cstdio>
#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "core/kdf.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/module.hpp"
#include "pg/pending.hpp"

using colcrypt::ByteView;
using colcrypt::pg::ColumnKey;
using colcrypt::pg::guarded;
using colcrypt::pg::KeyPrivilege;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_in);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_out);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_coerce);
PG_FUNCTION_INFO_V1(colcrypt_text_to_encrypted);
PG_FUNCTION_INFO_V1(colcrypt_require_sealed);
PG_FUNCTION_INFO_V1(colcrypt_reset_privilege_cache);
}

namespace {

constexpr char kContextPrefix[] = "colcrypt.column:";

ByteView bytes_of(const struct varlena* v) {
  return ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

bool valid_name(const char* s) {
  bool ok = false;
  guarded(ValueOrigin::Stored, [&] { ok = colcrypt::valid_key_name(s); });
  return ok;
}

Oid colcrypt_namespace(bool missing_ok) { return get_namespace_oid("colcrypt", missing_ok); }

Oid catalog_relid(const char* name) {
  const Oid relid = get_relname_relid(name, colcrypt_namespace(false));
  if (!OidIsValid(relid))
    ereport(
        ERROR,
        (errcode(ERRCODE_UNDEFINED_TABLE), errmsg("catalog colcrypt.%s is missing", name),
         errhint("Reinstall the extension: DROP EXTENSION colcrypt; CREATE EXTENSION colcrypt;")));
  return relid;
}

// Runs body (which uses SPI) as the owner of the catalog relid, with
// search_path = pg_catalog, pg_temp. Restores both on success and on error.
template <typename Body>
void as_catalog_owner(Oid relid, Body&& body) {
  HeapTuple tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
  if (!HeapTupleIsValid(tuple)) elog(ERROR, "cache lookup failed for relation %u", relid);
  const Oid owner = reinterpret_cast<Form_pg_class>(GETSTRUCT(tuple))->relowner;
  ReleaseSysCache(tuple);

  Oid saved_user;
  int saved_context;
  GetUserIdAndSecContext(&saved_user, &saved_context);
  const int nest = NewGUCNestLevel();
  SetUserIdAndSecContext(
      owner, saved_context | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
  PG_TRY();
  {
    (void)set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
                            GUC_ACTION_SAVE, true, 0, false);
    if (SPI_connect() != SPI_OK_CONNECT) elog(ERROR, "SPI_connect failed");
    body();
    SPI_finish();
  }
  PG_FINALLY();
  { SetUserIdAndSecContext(saved_user, saved_context); }
  PG_END_TRY();
  AtEOXact_GUC(true, nest);
}

// ---------------------------------------------------------------- typmods

// The typmod of (key, binding): 31 bits of HMAC-SHA256 over both, so that a
// dump restored elsewhere, or pg_upgrade, gets the same number.
int32 typmod_of(const char* key, const char* binding) {
  int32 typmod = 0;
  guarded(ValueOrigin::Stored, [&] {
    const size_t kl = std::strlen(key);
    const size_t bl = std::strlen(binding);
    uint8_t data[2 * 64 + 1];
    std::memcpy(data, key, kl);
    data[kl] = 0;
    std::memcpy(data + kl + 1, binding, bl);
    const auto mac =
        colcrypt::hmac_sha256(ByteView::of("colcrypt column key"), ByteView(data, kl + 1 + bl));
    const uint32_t v = (uint32_t{mac[0]} << 24) | (uint32_t{mac[1]} << 16) |
                       (uint32_t{mac[2]} << 8) | uint32_t{mac[3]};
    typmod = static_cast<int32>(v & 0x7fffffffu);
  });
  return typmod;
}

// Per backend: typmod -> entry. The mapping is a function of (key, binding),
// so an entry never goes stale.
constexpr int kColumnCacheSize = 64;
ColumnKey column_cache[kColumnCacheSize];
int column_cache_used = 0;
int column_cache_next = 0;

void fill_entry(ColumnKey& e, int32 typmod, const char* key, const char* binding) {
  e.typmod = typmod;
  strlcpy(e.key_name, key, sizeof e.key_name);
  strlcpy(e.binding, binding, sizeof e.binding);
  e.context_size =
      static_cast<size_t>(snprintf(e.context, sizeof e.context, "%s%s", kContextPrefix, binding));
}

const ColumnKey* cached_column(int32 typmod) {
  for (int i = 0; i < column_cache_used; ++i)
    if (column_cache[i].typmod == typmod) return &column_cache[i];
  return nullptr;
}

const ColumnKey& remember_column(int32 typmod, const char* key, const char* binding) {
  ColumnKey* slot;
  if (column_cache_used < kColumnCacheSize) {
    slot = &column_cache[column_cache_used++];
  } else {
    slot = &column_cache[column_cache_next];
    column_cache_next = (column_cache_next + 1) % kColumnCacheSize;
  }
  fill_entry(*slot, typmod, key, binding);
  return *slot;
}

// Reads the catalog entry of typmod; false when there is none. latest: see
// this transaction's own inserts (a new snapshot; not in parallel mode).
bool lookup_column_key(int32 typmod, char (&key)[64], char (&binding)[64], bool latest = false) {
  bool found = false;
  as_catalog_owner(catalog_relid("column_keys"), [&] {
    Oid types[1] = {INT4OID};
    Datum values[1] = {Int32GetDatum(typmod)};
    if (SPI_execute_with_args("SELECT key_name, binding FROM colcrypt.column_keys "
                              "WHERE id OPERATOR(pg_catalog.=) $1",
                              1, types, values, nullptr, !latest, 1) != SPI_OK_SELECT)
      elog(ERROR, "SPI_execute_with_args failed");
    if (SPI_processed == 1) {
      found = true;
      strlcpy(key, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), sizeof key);
      strlcpy(binding, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
              sizeof binding);
    }
  });
  return found;
}

void register_column_key(int32 typmod, const char* key, const char* binding) {
  char found_key[64];
  char found_binding[64];
  if (lookup_column_key(typmod, found_key, found_binding, true)) {
    if (std::strcmp(found_key, key) == 0 && std::strcmp(found_binding, binding) == 0) return;
    ereport(ERROR,
            (errcode(ERRCODE_DUPLICATE_OBJECT),
             errmsg("colcrypt binding \"%s\" of key \"%s\" collides with another column binding",
                    binding, key),
             errhint("Give the column another binding: colcrypt.encrypted('%s', 'other_label').",
                     key)));
  }
  as_catalog_owner(catalog_relid("column_keys"), [&] {
    Oid types[3] = {INT4OID, TEXTOID, TEXTOID};
    Datum values[3] = {Int32GetDatum(typmod), CStringGetTextDatum(key),
                       CStringGetTextDatum(binding)};
    if (SPI_execute_with_args("INSERT INTO colcrypt.column_keys (id, key_name, binding) "
                              "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                              3, types, values, nullptr, false, 0) != SPI_OK_INSERT)
      elog(ERROR, "SPI_execute_with_args failed");
  });
  // A concurrent insert of another pair with the same id: refuse.
  if (!lookup_column_key(typmod, found_key, found_binding, true) ||
      std::strcmp(found_key, key) != 0 || std::strcmp(found_binding, binding) != 0)
    ereport(ERROR, (errcode(ERRCODE_DUPLICATE_OBJECT),
                    errmsg("colcrypt binding \"%s\" of key \"%s\" collides with another column "
                           "binding",
                           binding, key)));
}

// ---------------------------------------------------------------- privileges

struct PrivilegeEntry {
  Oid user;
  KeyPrivilege privilege;
  bool allowed;
  char key_name[64];
};
constexpr int kPrivilegeCacheSize = 32;
PrivilegeEntry privilege_cache[kPrivilegeCacheSize];
int privilege_cache_used = 0;

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

bool lookup_privilege(Oid user, const char* key, KeyPrivilege privilege) {
  bool allowed = false;
  // Grantees first (as the catalog owner), membership after (as the caller).
  Oid roles[64];
  int nroles = 0;
  as_catalog_owner(catalog_relid("key_grants"), [&] {
    Oid types[2] = {TEXTOID, TEXTOID};
    Datum values[2] = {CStringGetTextDatum(key), CStringGetTextDatum(privilege_name(privilege))};
    if (SPI_execute_with_args("SELECT role::pg_catalog.oid FROM colcrypt.key_grants "
                              "WHERE key_name OPERATOR(pg_catalog.=) $1 "
                              "AND privilege OPERATOR(pg_catalog.=) $2",
                              2, types, values, nullptr, true, 0) != SPI_OK_SELECT)
      elog(ERROR, "SPI_execute_with_args failed");
    for (uint64 i = 0; i < SPI_processed && nroles < 64; ++i) {
      bool isnull;
      const Datum d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
      if (!isnull) roles[nroles++] = DatumGetObjectId(d);
    }
  });
  for (int i = 0; i < nroles && !allowed; ++i) allowed = has_privs_of_role(user, roles[i]);
  return allowed;
}

// ---------------------------------------------------------------- planner hook

planner_hook_type previous_planner = nullptr;

bool is_call_of(Node* node, Oid funcid) {
  if (node != nullptr && IsA(node, RelabelType))
    node = reinterpret_cast<Node*>(reinterpret_cast<RelabelType*>(node)->arg);
  return node != nullptr && IsA(node, FuncExpr) &&
         reinterpret_cast<FuncExpr*>(node)->funcid == funcid;
}

// True when a value of (type_oid, typmod) is a colcrypt.encrypted without a
// key: the type itself or a domain over it, with no key in the type modifier.
bool keyless(Oid type_oid, int32 typmod, Oid type) {
  const Oid base = getBaseTypeAndTypmod(type_oid, &typmod);
  return base == type && typmod < 0;
}

// require_sealed(expr), relabelled to expr's own type (a domain) if need be.
Expr* require_sealed_call(Expr* expr, Oid type, Oid check) {
  const Oid expr_type = exprType(reinterpret_cast<Node*>(expr));
  const int32 expr_typmod = exprTypmod(reinterpret_cast<Node*>(expr));
  Expr* call = reinterpret_cast<Expr*>(
      makeFuncExpr(check, type, list_make1(expr), InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL));
  if (expr_type != type)
    call = reinterpret_cast<Expr*>(
        makeRelabelType(call, expr_type, expr_typmod, InvalidOid, COERCE_IMPLICIT_CAST));
  return call;
}

void guard_targets(List* targets, Oid relid, Oid type, Oid check) {
  ListCell* lc;
  foreach (lc, targets) {
    TargetEntry* tle = lfirst_node(TargetEntry, lc);
    if (tle->resjunk || tle->resno <= 0) continue;
    Oid atttype;
    int32 atttypmod;
    Oid attcollation;
    get_atttypetypmodcoll(relid, tle->resno, &atttype, &atttypmod, &attcollation);
    if (!keyless(atttype, atttypmod, type)) continue;
    if (is_call_of(reinterpret_cast<Node*>(tle->expr), check)) continue;
    tle->expr = require_sealed_call(tle->expr, type, check);
  }
}

// The query of CREATE TABLE AS, SELECT INTO, CREATE MATERIALIZED VIEW and
// REFRESH MATERIALIZED VIEW: every output column that would become a column
// without a key gets require_sealed(). Output columns with a key keep their
// type modifier (the coercion already sealed them).
void guard_select(Query* query, Oid type, Oid check) {
  ListCell* lc;
  if (query->setOperations != nullptr) {
    foreach (lc, query->rtable) {
      RangeTblEntry* rte = lfirst_node(RangeTblEntry, lc);
      if (rte->rtekind == RTE_SUBQUERY && rte->subquery != nullptr)
        guard_select(rte->subquery, type, check);
    }
    return;
  }
  foreach (lc, query->targetList) {
    TargetEntry* tle = lfirst_node(TargetEntry, lc);
    if (tle->resjunk) continue;
    Node* expr = reinterpret_cast<Node*>(tle->expr);
    if (!keyless(exprType(expr), exprTypmod(expr), type)) continue;
    if (is_call_of(expr, check)) continue;
    tle->expr = require_sealed_call(tle->expr, type, check);
  }
}

void guard_query(Query* query, Oid type, Oid check) {
  ListCell* lc;
  foreach (lc, query->cteList) {
    CommonTableExpr* cte = lfirst_node(CommonTableExpr, lc);
    if (cte->ctequery != nullptr && IsA(cte->ctequery, Query))
      guard_query(reinterpret_cast<Query*>(cte->ctequery), type, check);
  }
  if (query->resultRelation <= 0) return;
  if (query->commandType != CMD_INSERT && query->commandType != CMD_UPDATE &&
      query->commandType != CMD_MERGE)
    return;
  const RangeTblEntry* rte = rt_fetch(query->resultRelation, query->rtable);
  if (rte->rtekind != RTE_RELATION) return;
  guard_targets(query->targetList, rte->relid, type, check);
  if (query->onConflict != nullptr)
    guard_targets(query->onConflict->onConflictSet, rte->relid, type, check);
  foreach (lc, query->mergeActionList) {
    MergeAction* action = lfirst_node(MergeAction, lc);
    guard_targets(action->targetList, rte->relid, type, check);
  }
}

// The type colcrypt.encrypted and colcrypt.require_sealed(); false when the
// extension is not installed in this database.
bool guard_functions(Oid& type, Oid& check) {
  const Oid ns = colcrypt_namespace(true);
  if (!OidIsValid(ns)) return false;
  type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid, CStringGetDatum("encrypted"),
                         ObjectIdGetDatum(ns));
  if (!OidIsValid(type)) return false;
  // A catalog lookup, not LookupFuncName: that checks USAGE on the schema, and
  // a role without it (a table owner outside colcrypt_user) could then write
  // to no table at all.
  Oid argtypes[1] = {type};
  check = GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid, CStringGetDatum("require_sealed"),
                          PointerGetDatum(buildoidvector(argtypes, 1)), ObjectIdGetDatum(ns));
  return OidIsValid(check);
}

// CREATE TABLE AS / CREATE MATERIALIZED VIEW / REFRESH MATERIALIZED VIEW
// statements running. While one runs, every SELECT planned gets the check:
// its own query, and also any other (an event trigger's, a function's), which
// costs a check of sealed values at most and never misses the statement's own
// query.
int table_from_select_depth = 0;
// COPY FROM statements running (at any nesting level: in functions, DO blocks).
int copy_from_depth = 0;

PlannedStmt* colcrypt_planner(Query* parse, const char* query_string, int cursor_options,
                              ParamListInfo bound_params) {
  const bool table_from_select = table_from_select_depth > 0;
  const bool writes = parse->commandType != CMD_SELECT && parse->commandType != CMD_UTILITY;
  const bool select_into_table = table_from_select && parse->commandType == CMD_SELECT;
  if (writes || select_into_table || parse->cteList != NIL) {
    Oid type;
    Oid check;
    if (guard_functions(type, check)) {
      // also a SELECT's data-modifying CTEs
      guard_query(parse, type, check);
      if (select_into_table) guard_select(parse, type, check);
    }
  }
  if (previous_planner != nullptr)
    return previous_planner(parse, query_string, cursor_options, bound_params);
  return standard_planner(parse, query_string, cursor_options, bound_params);
}

// A pending plaintext kept as the "missing value" of a column added with a
// constant default (ALTER TABLE ... ADD COLUMN c colcrypt.encrypted DEFAULT
// 'x'): refused, so that the ALTER TABLE fails.
void check_missing_values(Oid relid, Oid type) {
  List* relids = find_all_inheritors(relid, AccessShareLock, nullptr);
  ListCell* lc;
  foreach (lc, relids) {
    Relation rel = relation_open(lfirst_oid(lc), AccessShareLock);
    const TupleDesc desc = RelationGetDescr(rel);
    if (desc->constr != nullptr && desc->constr->missing != nullptr) {
      for (int i = 0; i < desc->natts; ++i) {
        const Form_pg_attribute att = TupleDescAttr(desc, i);
        const AttrMissing& missing = desc->constr->missing[i];
        if (att->attisdropped || !missing.am_present) continue;
        if (getBaseType(att->atttypid) != type) continue;
        struct varlena* value = pg_detoast_datum_packed(
            reinterpret_cast<struct varlena*>(DatumGetPointer(missing.am_value)));
        if (colcrypt::pg::is_pending(bytes_of(value)))
          ereport(ERROR,
                  (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
                   errmsg("plaintext cannot become colcrypt.encrypted without a key"),
                   errdetail("The default of column \"%s\" is a plaintext, and the column has "
                             "no key.",
                             NameStr(att->attname)),
                   errhint("Store it in a key-bound column, or use "
                           "colcrypt.encrypt_field(value, 'key_name').")));
      }
    }
    relation_close(rel, NoLock);
  }
}

ProcessUtility_hook_type previous_utility = nullptr;

void colcrypt_utility(PlannedStmt* pstmt, const char* query_string, bool read_only_tree,
                      ProcessUtilityContext context, ParamListInfo params,
                      QueryEnvironment* query_env, DestReceiver* dest, QueryCompletion* qc) {
  Node* stmt = pstmt->utilityStmt;
  volatile const bool copy_from =
      IsA(stmt, CopyStmt) && reinterpret_cast<CopyStmt*>(stmt)->is_from;
  Node* explained = IsA(stmt, ExplainStmt) ? reinterpret_cast<ExplainStmt*>(stmt)->query : nullptr;
  if (explained != nullptr && IsA(explained, Query))
    explained = reinterpret_cast<Query*>(explained)->utilityStmt;
  volatile const bool table_from_select =
      IsA(stmt, CreateTableAsStmt) || IsA(stmt, RefreshMatViewStmt) ||
      (explained != nullptr && IsA(explained, CreateTableAsStmt));
  if (copy_from) ++copy_from_depth;
  if (table_from_select) ++table_from_select_depth;
  PG_TRY();
  {
    if (previous_utility != nullptr)
      previous_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
    else
      standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env,
                              dest, qc);
  }
  PG_CATCH();
  {
    if (copy_from) --copy_from_depth;
    if (table_from_select) --table_from_select_depth;
    PG_RE_THROW();
  }
  PG_END_TRY();
  if (copy_from) --copy_from_depth;
  if (table_from_select) --table_from_select_depth;
  if (IsA(stmt, AlterTableStmt)) {
    const AlterTableStmt* alter = reinterpret_cast<AlterTableStmt*>(stmt);
    Oid type;
    Oid check;
    if (alter->relation != nullptr &&
        (alter->objtype == OBJECT_TABLE || alter->objtype == OBJECT_FOREIGN_TABLE) &&
        guard_functions(type, check)) {
      const Oid relid = RangeVarGetRelid(alter->relation, NoLock, true);
      if (OidIsValid(relid)) check_missing_values(relid, type);
    }
  }
}

}  // namespace

namespace colcrypt::pg {

const ColumnKey& column_key(int32_t typmod) {
  if (const ColumnKey* hit = cached_column(typmod)) return *hit;
  char key[64];
  char binding[64];
  if (!lookup_column_key(typmod, key, binding))
    ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
                    errmsg("colcrypt.column_keys has no entry for type modifier %d", typmod),
                    errhint("The entry is made when a column is declared as "
                            "colcrypt.encrypted('key_name'); do not delete entries in use.")));
  return remember_column(typmod, key, binding);
}

void check_key_privilege(const char* key_name, size_t key_name_size, KeyPrivilege privilege) {
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
  if (superuser()) return;
  char key[64];
  if (key_name_size >= sizeof key) key_name_size = sizeof key - 1;
  std::memcpy(key, key_name, key_name_size);
  key[key_name_size] = '\0';
  const Oid user = GetUserId();
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
    if (privilege_cache_used < kPrivilegeCacheSize) {
      PrivilegeEntry& e = privilege_cache[privilege_cache_used++];
      e.user = user;
      e.privilege = privilege;
      e.allowed = allowed;
      strlcpy(e.key_name, key, sizeof e.key_name);
    }
  }
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

void reset_key_privileges() { privilege_cache_used = 0; }

void reject_pending(ByteView value) {
  if (!is_pending(value)) return;
  ereport(ERROR,
          (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
           errmsg("plaintext given as colcrypt.encrypted was not encrypted"),
           errdetail("Text that is not a sealed value (\"colcrypt:...\") becomes a "
                     "colcrypt.encrypted value only when it is stored in a key-bound column."),
           errhint("Declare the column as colcrypt.encrypted('key_name'), or use "
                   "colcrypt.encrypt_field(value, 'key_name').")));
}

bool claims_sealed(const char* text, size_t size) {
  size_t i = 0;
  while (i < size && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r' ||
                      text[i] == '\f' || text[i] == '\v'))
    ++i;
  const std::string_view prefix = colcrypt::kTextPrefix;
  return size - i >= prefix.size() && pg_strncasecmp(text + i, prefix.data(), prefix.size()) == 0;
}

struct varlena* seal_for_column(int32_t typmod, ByteView plaintext) {
  const ColumnKey column = column_key(typmod);
  check_key_privilege(column.key_name, std::strlen(column.key_name), KeyPrivilege::Encrypt);
  check_sealable_size(plaintext.size);
  const size_t size = plaintext.size + colcrypt::kEnvelopeOverhead;
  const KeydSettings settings = prepare_key_access();
  struct varlena* result = static_cast<struct varlena*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::Stored, [&] {
    encrypt_value(settings, column.key_name, colcrypt::PayloadType::Text,
                  ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size),
                  plaintext, reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  return result;
}

void verify_for_column(int32_t typmod, ByteView envelope) {
  const ColumnKey column = column_key(typmod);
  check_key_privilege(column.key_name, std::strlen(column.key_name), KeyPrivilege::Encrypt);
  guarded(ValueOrigin::Stored, [&] { colcrypt::parse_header(envelope); });
  const KeydSettings settings = prepare_key_access();
  uint8_t* scratch = static_cast<uint8_t*>(palloc(envelope.size));
  guarded(ValueOrigin::Stored, [&] {
    verify_value(settings, envelope,
                 ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size),
                 column.key_name, scratch);
  });
  pfree(scratch);
}

bool in_copy_from() {
  if (copy_from_depth > 0) return true;
  if (ActivePortal == nullptr || ActivePortal->commandTag != CMDTAG_COPY) return false;
  ListCell* lc;
  foreach (lc, ActivePortal->stmts) {
    Node* stmt = static_cast<Node*>(lfirst(lc));
    if (IsA(stmt, PlannedStmt)) stmt = reinterpret_cast<PlannedStmt*>(stmt)->utilityStmt;
    if (stmt != nullptr && IsA(stmt, CopyStmt) && reinterpret_cast<CopyStmt*>(stmt)->is_from)
      return true;
  }
  return false;
}

void install_column_hooks() {
  previous_planner = planner_hook;
  planner_hook = colcrypt_planner;
  previous_utility = ProcessUtility_hook;
  ProcessUtility_hook = colcrypt_utility;
}

}  // namespace colcrypt::pg

// encrypted_typmod_in(cstring[]) -> integer: ('key_name') or ('key_name', 'binding').
// Without a binding, a fresh random one: every column declared this way gets
// an identity of its own, which typmod_out prints so that dumps keep it.
Datum colcrypt_encrypted_typmod_in(PG_FUNCTION_ARGS) {
  ArrayType* array = PG_GETARG_ARRAYTYPE_P(0);
  Datum* items;
  int count;
  deconstruct_array(array, CSTRINGOID, -2, false, TYPALIGN_CHAR, &items, nullptr, &count);
  if (count < 1 || count > 2)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("colcrypt.encrypted takes a key name and optionally a binding"),
                    errhint("Declare the column as colcrypt.encrypted('key_name').")));
  const char* key = DatumGetCString(items[0]);
  if (!valid_name(key))
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt key name"),
                    errdetail("Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' "
                              "and '-', and do not start with '.' or '-'.")));
  char binding[64];
  if (count == 2) {
    if (!valid_name(DatumGetCString(items[1])))
      ereport(ERROR,
              (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt column binding"),
               errdetail("Bindings follow the rules of key names: 1 to 63 characters from A-Z, "
                         "a-z, 0-9, '_', '.' and '-', not starting with '.' or '-'.")));
    strlcpy(binding, DatumGetCString(items[1]), sizeof binding);
  } else {
    uint8_t random[8];
    if (!pg_strong_random(random, sizeof random))
      ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("could not generate random bytes")));
    for (size_t i = 0; i < sizeof random; ++i) snprintf(binding + 2 * i, 3, "%02x", random[i]);
  }
  const int32 typmod = typmod_of(key, binding);
  register_column_key(typmod, key, binding);
  remember_column(typmod, key, binding);
  PG_RETURN_INT32(typmod);
}

// encrypted_typmod_out(integer) -> cstring: "('key_name','binding')".
Datum colcrypt_encrypted_typmod_out(PG_FUNCTION_ARGS) {
  const int32 typmod = PG_GETARG_INT32(0);
  if (typmod < 0) PG_RETURN_CSTRING(pstrdup(""));
  const ColumnKey& column = colcrypt::pg::column_key(typmod);
  PG_RETURN_CSTRING(psprintf("('%s','%s')", column.key_name, column.binding));
}

// encrypted(encrypted, integer, boolean): the typmod coercion Postgres applies
// when a value is stored in (or cast to) a key-bound column. Seals a pending
// plaintext under the column's key; accepts a sealed value only when it was
// sealed for this column (key and binding), and refuses any other.
Datum colcrypt_encrypted_coerce(PG_FUNCTION_ARGS) {
  struct varlena* value = PG_GETARG_VARLENA_PP(0);
  const int32 typmod = PG_GETARG_INT32(1);
  if (typmod < 0) PG_RETURN_POINTER(value);
  const ByteView bytes = bytes_of(value);
  if (!colcrypt::pg::is_pending(bytes)) {
    colcrypt::pg::verify_for_column(typmod, bytes);
    PG_RETURN_POINTER(value);
  }
  if (bytes.size < colcrypt::pg::kPendingOverhead)
    ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("malformed colcrypt.encrypted value")));
  const size_t size = bytes.size - colcrypt::pg::kPendingOverhead;
  uint8_t* plaintext = static_cast<uint8_t*>(palloc(size + 1));
  struct varlena* result = nullptr;
  PG_TRY();
  {
    guarded(ValueOrigin::TextInput, [&] { colcrypt::pg::open_pending(bytes, plaintext); });
    result = colcrypt::pg::seal_for_column(typmod, ByteView(plaintext, size));
  }
  PG_FINALLY();
  { explicit_bzero(plaintext, size + 1); }
  PG_END_TRY();
  pfree(plaintext);
  PG_RETURN_POINTER(result);
}

// encrypted(text, integer, boolean): the assignment cast from text (typed
// parameters, INSERT ... SELECT from a text column, ALTER COLUMN ... TYPE).
// Same rule as the input function: a "colcrypt:" prefix claims a sealed value.
Datum colcrypt_text_to_encrypted(PG_FUNCTION_ARGS) {
  text* input = PG_GETARG_TEXT_PP(0);
  const int32 typmod = PG_GETARG_INT32(1);
  const char* data = VARDATA_ANY(input);
  const size_t size = VARSIZE_ANY_EXHDR(input);
  if (colcrypt::pg::claims_sealed(data, size)) {
    struct varlena* value = colcrypt::pg::parse_sealed_text(data, size);
    if (typmod >= 0) colcrypt::pg::verify_for_column(typmod, bytes_of(value));
    PG_RETURN_POINTER(value);
  }
  if (typmod < 0)
    ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
                    errmsg("plaintext cannot become colcrypt.encrypted without a key"),
                    errdetail("The target has no key: it is colcrypt.encrypted, not "
                              "colcrypt.encrypted('key_name')."),
                    errhint("Store it in a key-bound column, or use colcrypt.encrypt_field(value, "
                            "'key_name').")));
  PG_RETURN_POINTER(colcrypt::pg::seal_for_column(
      typmod, ByteView(reinterpret_cast<const uint8_t*>(data), size)));
}

// require_sealed(encrypted) -> encrypted: wrapped by the planner hook around
// every value stored in a colcrypt.encrypted column that has no key.
Datum colcrypt_require_sealed(PG_FUNCTION_ARGS) {
  struct varlena* value = PG_GETARG_VARLENA_PP(0);
  colcrypt::pg::reject_pending(bytes_of(value));
  PG_RETURN_POINTER(value);
}

// reset_privilege_cache(): called by grant_key / revoke_key.
Datum colcrypt_reset_privilege_cache(PG_FUNCTION_ARGS) {
  colcrypt::pg::reset_key_privileges();
  PG_RETURN_VOID();
}
