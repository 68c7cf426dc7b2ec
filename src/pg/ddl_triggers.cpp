// The DDL event triggers that give every column holding colcrypt.encrypted
// its sealed CHECK constraint (see sealed.cpp), and refuse to drop a
// column's key: _ddl_start (ALTER TABLE, and the late frame of a CREATE
// TABLE AS), _ddl_end (adds the missing checks) and _table_rewrite.
// docs/columns.md describes the design.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/relation.h"
#include "access/tupdesc_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_constraint.h"
#include "catalog/pg_inherits.h"
#include "commands/event_trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "nodes/readfuncs.h"
#include "parser/parser.h"
#include "parser/parse_relation.h"
#include "parser/parse_type.h"
#include "storage/bufmgr.h"
#include "storage/proc.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include <cstring>

#include "pg/columns.hpp"
#include "pg/columns_internal.hpp"

using colcrypt::pg::check_sealed;
using colcrypt::pg::current_frame;
using colcrypt::pg::forget_late_frame;
using colcrypt::pg::FrameKind;
using colcrypt::pg::guard_functions;
using colcrypt::pg::holds_encrypted;
using colcrypt::pg::late_frame;
using colcrypt::pg::sealed_check_name;
using colcrypt::pg::sealed_function;
using colcrypt::pg::TableFrame;
using colcrypt::pg::validating_new_rows;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_ddl_start);
PG_FUNCTION_INFO_V1(colcrypt_ddl_end);
PG_FUNCTION_INFO_V1(colcrypt_table_rewrite);
}

namespace {

// True when rel has CHECK (colcrypt.sealed(<attnum>)).
bool has_sealed_check(Relation rel, AttrNumber attnum, Oid sealed) {
  const TupleConstr* constr = RelationGetDescr(rel)->constr;
  if (constr == nullptr) return false;
  for (int i = 0; i < constr->num_check; ++i) {
    Node* expr = static_cast<Node*>(stringToNode(constr->check[i].ccbin));
    if (!IsA(expr, FuncExpr)) continue;
    const FuncExpr* call = reinterpret_cast<FuncExpr*>(expr);
    if (call->funcid != sealed || list_length(call->args) != 1) continue;
    const Node* arg = static_cast<Node*>(linitial(call->args));
    if (IsA(arg, Var) && reinterpret_cast<const Var*>(arg)->varattno == attnum) return true;
  }
  return false;
}

// True when con is "CONSTRAINT name CHECK (colcrypt.sealed(col)) NOT VALID"
// (what pg_dump writes for a sealed check added NOT VALID) and relid already
// has a sealed check on col under that name. Reads the catalog only: the
// caller (ddl_command_start) holds no lock on relid yet.
bool duplicate_sealed_check(Oid relid, const Constraint* con, Oid sealed) {
  if (con == nullptr || !IsA(con, Constraint) || con->contype != CONSTR_CHECK ||
      !con->skip_validation || con->conname == nullptr || con->raw_expr == nullptr ||
      !IsA(con->raw_expr, FuncCall))
    return false;
  const FuncCall* call = reinterpret_cast<const FuncCall*>(con->raw_expr);
  if (std::strcmp(strVal(llast(call->funcname)), "sealed") != 0 || list_length(call->args) != 1 ||
      !IsA(linitial(call->args), ColumnRef))
    return false;
  const ColumnRef* ref = static_cast<const ColumnRef*>(linitial(call->args));
  if (list_length(ref->fields) != 1 || !IsA(linitial(ref->fields), String)) return false;
  const AttrNumber attnum = get_attnum(relid, strVal(linitial(ref->fields)));
  if (attnum == InvalidAttrNumber) return false;
  const Oid existing = get_relation_constraint_oid(relid, con->conname, true);
  if (!OidIsValid(existing)) return false;
  HeapTuple tuple = SearchSysCache1(CONSTROID, ObjectIdGetDatum(existing));
  if (!HeapTupleIsValid(tuple)) return false;
  bool isnull;
  const Datum bin = SysCacheGetAttr(CONSTROID, tuple, Anum_pg_constraint_conbin, &isnull);
  bool same = false;
  if (!isnull) {
    const Node* expr = static_cast<Node*>(stringToNode(TextDatumGetCString(bin)));
    if (IsA(expr, FuncExpr)) {
      const FuncExpr* f = reinterpret_cast<const FuncExpr*>(expr);
      const Node* arg = list_length(f->args) == 1 ? static_cast<Node*>(linitial(f->args)) : nullptr;
      same = f->funcid == sealed && arg != nullptr && IsA(arg, Var) &&
             reinterpret_cast<const Var*>(arg)->varattno == attnum;
    }
  }
  ReleaseSysCache(tuple);
  return same;
}

// Tables rewritten in this transaction (event table_rewrite): their rows
// were all written anew, so a check added after must validate them.
List* rewritten = NIL;  // in TopTransactionContext
LocalTransactionId rewritten_in = InvalidLocalTransactionId;

void note_rewrite(Oid relid) {
  if (rewritten_in != MyProc->lxid) {
    rewritten = NIL;
    rewritten_in = MyProc->lxid;
  }
  const MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
  rewritten = lappend_oid(rewritten, relid);
  MemoryContextSwitchTo(old);
}

bool rewritten_now(const List* relids) {
  if (rewritten_in != MyProc->lxid) return false;
  const ListCell* lc;
  foreach (lc, relids)
    if (list_member_oid(rewritten, lfirst_oid(lc))) return true;
  return false;
}

// True when none of the relations has a block of data: validating a check on
// them costs nothing.
bool all_empty(const List* relids) {
  const ListCell* lc;
  foreach (lc, relids) {
    Relation rel = relation_open(lfirst_oid(lc), AccessShareLock);
    const bool empty =
        !RELKIND_HAS_STORAGE(rel->rd_rel->relkind) || RelationGetNumberOfBlocks(rel) == 0;
    relation_close(rel, AccessShareLock);
    if (!empty) return false;
  }
  return true;
}

// How add_sealed_checks treats the rows already in the table.
enum class ExistingRows {
  // Checked by a scan under the ALTER TABLE's lock: a new table filled by a
  // query, a table after a rewrite, or an empty one.
  Validate,
  // An ALTER TABLE that rewrote nothing and has rows (ADD COLUMN, the online
  // migration of a large table): the only values that can be new are the
  // added columns' stored default ("missing value"), checked here, and the
  // check is added NOT VALID: no scan, no long lock; it holds for every row
  // written from now on, and ALTER TABLE ... VALIDATE CONSTRAINT checks the
  // old rows under a lock that lets writes go on.
  NotValid,
  // Every row was checked as it was stored (CREATE TABLE AS, see
  // SealedReceiver): the check is added valid without a scan, as CREATE TABLE
  // adds its own checks (skip_validation, initially_valid).
  Checked,
};

// Adds the missing sealed checks of a table (and, through ALTER TABLE, of its
// inheritors and partitions), all in one ALTER TABLE: the event trigger that
// this ALTER TABLE fires in turn finds nothing left to add. Runs inside SPI.
void add_sealed_checks(Oid relid, Oid type, Oid sealed, ExistingRows rows) {
  Relation rel = try_relation_open(relid, AccessShareLock);
  if (rel == nullptr) return;
  const char relkind = rel->rd_rel->relkind;
  StringInfoData command;
  initStringInfo(&command);
  List* columns = NIL;
  if (relkind == RELKIND_RELATION || relkind == RELKIND_PARTITIONED_TABLE) {
    const TupleDesc desc = RelationGetDescr(rel);
    for (int i = 0; i < desc->natts; ++i) {
      const Form_pg_attribute att = TupleDescAttr(desc, i);
      if (att->attisdropped || !holds_encrypted(att->atttypid, type)) continue;
      if (has_sealed_check(rel, att->attnum, sealed)) continue;
      char name[NAMEDATALEN];
      sealed_check_name(name, NameStr(att->attname));
      appendStringInfo(&command, "%s ADD CONSTRAINT %s CHECK (colcrypt.sealed(%s))%s",
                       command.len == 0 ? "" : ",", quote_identifier(name),
                       quote_identifier(NameStr(att->attname)),
                       rows == ExistingRows::NotValid ? " NOT VALID" : "");
      columns = lappend(columns, pstrdup(NameStr(att->attname)));
    }
  }
  const char* table = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
                                                 RelationGetRelationName(rel));
  relation_close(rel, AccessShareLock);
  if (command.len == 0) return;
  if (rows == ExistingRows::NotValid) {
    List* relids = find_all_inheritors(relid, AccessShareLock, nullptr);
    ListCell* lc;
    foreach (lc, relids) {
      Relation child = relation_open(lfirst_oid(lc), AccessShareLock);
      const TupleDesc desc = RelationGetDescr(child);
      ListCell* cc;
      foreach (cc, columns) {
        const AttrNumber attnum = attnameAttNum(child, static_cast<const char*>(lfirst(cc)), false);
        if (attnum <= 0 || desc->constr == nullptr || desc->constr->missing == nullptr) continue;
        const AttrMissing& missing = desc->constr->missing[attnum - 1];
        if (missing.am_present)
          check_sealed(missing.am_value, TupleDescAttr(desc, attnum - 1)->atttypid, type);
      }
      relation_close(child, AccessShareLock);
    }
  }
  const char* sql = psprintf("ALTER TABLE %s%s", table, command.data);
  if (rows != ExistingRows::Checked) {
    validating_new_rows = rows == ExistingRows::Validate;
    PG_TRY();
    {
      if (SPI_execute(sql, false, 0) != SPI_OK_UTILITY) elog(ERROR, "SPI_execute failed");
    }
    PG_FINALLY();
    { validating_new_rows = false; }
    PG_END_TRY();
    return;
  }
  // The same statement (event triggers see the same command), its constraints
  // marked valid without a scan; SQL has no syntax for that, so it runs as a
  // parse tree, with what SPI would do around it.
  RawStmt* raw = linitial_node(RawStmt, raw_parser(sql, RAW_PARSE_DEFAULT));
  ListCell* lc;
  foreach (lc, castNode(AlterTableStmt, raw->stmt)->cmds) {
    Constraint* con = castNode(Constraint, lfirst_node(AlterTableCmd, lc)->def);
    con->skip_validation = true;
    con->initially_valid = true;
  }
  PlannedStmt* pstmt = makeNode(PlannedStmt);
  pstmt->commandType = CMD_UTILITY;
  pstmt->utilityStmt = raw->stmt;
  pstmt->stmt_location = raw->stmt_location;
  pstmt->stmt_len = raw->stmt_len;
  CommandCounterIncrement();
  PushActiveSnapshot(GetTransactionSnapshot());
  ProcessUtility(pstmt, sql, false, PROCESS_UTILITY_QUERY, nullptr, nullptr, None_Receiver,
                 nullptr);
  PopActiveSnapshot();
  CommandCounterIncrement();
}

}  // namespace

// Event trigger on ddl_command_start for ALTER TABLE: refuses to turn a
// key-bound column into one without a key (ALTER COLUMN c TYPE
// colcrypt.encrypted), which would drop its key and binding silently. An
// event trigger rather than the utility hook: it runs even in a session that
// has not loaded the library yet.
Datum colcrypt_ddl_start(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._ddl_start() is an event trigger")));
  const EventTriggerData* data = reinterpret_cast<EventTriggerData*>(fcinfo->context);
  // CREATE TABLE AS / SELECT INTO that began before this call loaded the
  // library (the utility hook gives every later one a frame): a frame until
  // its ddl_end, so that its rows are checked as they are stored as well.
  if (data->parsetree != nullptr && IsA(data->parsetree, CreateTableAsStmt)) {
    colcrypt::pg::begin_late_frame(reinterpret_cast<CreateTableAsStmt*>(data->parsetree));
    PG_RETURN_NULL();
  }
  Oid type;
  Oid check;
  if (data->parsetree == nullptr || !IsA(data->parsetree, AlterTableStmt) ||
      !guard_functions(type, check))
    PG_RETURN_NULL();
  AlterTableStmt* alter = reinterpret_cast<AlterTableStmt*>(data->parsetree);
  if (alter->relation == nullptr) PG_RETURN_NULL();
  const Oid relid = RangeVarGetRelid(alter->relation, NoLock, true);
  if (!OidIsValid(relid)) PG_RETURN_NULL();
  ListCell* lc;
  // A restore: the dump adds a NOT VALID sealed check after CREATE TABLE,
  // which already got one from the event trigger (validated: the table was
  // empty). The dump's would collide by name; the one in place is at least
  // as strong, so its ADD is dropped from the statement.
  const Oid sealed = sealed_function();
  foreach (lc, alter->cmds) {
    const AlterTableCmd* cmd = lfirst_node(AlterTableCmd, lc);
    if (cmd->subtype == AT_AddConstraint && OidIsValid(sealed) &&
        duplicate_sealed_check(relid, reinterpret_cast<const Constraint*>(cmd->def), sealed))
      alter->cmds = foreach_delete_current(alter->cmds, lc);
  }
  foreach (lc, alter->cmds) {
    const AlterTableCmd* cmd = lfirst_node(AlterTableCmd, lc);
    if (cmd->subtype != AT_AlterColumnType || cmd->name == nullptr) continue;
    const AttrNumber attnum = get_attnum(relid, cmd->name);
    if (attnum == InvalidAttrNumber) continue;
    Oid old_type;
    int32 old_typmod;
    Oid collation;
    get_atttypetypmodcoll(relid, attnum, &old_type, &old_typmod, &collation);
    if (getBaseTypeAndTypmod(old_type, &old_typmod) != type || old_typmod < 0) continue;
    const ColumnDef* def = reinterpret_cast<ColumnDef*>(cmd->def);
    Oid new_type;
    int32 new_typmod;
    typenameTypeIdAndMod(nullptr, def->typeName, &new_type, &new_typmod);
    if (getBaseTypeAndTypmod(new_type, &new_typmod) != type || new_typmod >= 0) continue;
    const colcrypt::pg::ColumnKey& column = colcrypt::pg::column_key(old_typmod);
    ereport(ERROR,
            (errcode(ERRCODE_DATATYPE_MISMATCH),
             errmsg("column \"%s\" would lose its colcrypt key", cmd->name),
             errdetail("The column is colcrypt.encrypted('%s','%s'); the new type has no key, so "
                       "plaintext written later would be refused and the binding forgotten.",
                       column.key_name, column.binding),
             errhint("Keep the type modifier: ALTER COLUMN %s TYPE "
                     "colcrypt.encrypted('%s','%s').",
                     quote_identifier(cmd->name), column.key_name, column.binding)));
  }
  PG_RETURN_NULL();
}

// Event trigger on ddl_command_end for CREATE TABLE, CREATE TABLE AS, SELECT
// INTO, ALTER TABLE and ALTER TYPE: adds the sealed checks the affected
// tables miss.
Datum colcrypt_ddl_end(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._ddl_end() is an event trigger")));
  Oid type;
  Oid check;
  if (!guard_functions(type, check)) PG_RETURN_NULL();
  const Oid sealed = sealed_function();
  if (!OidIsValid(sealed)) PG_RETURN_NULL();
  if (SPI_connect() != SPI_OK_CONNECT) elog(ERROR, "SPI_connect failed");
  // The relations the command made or altered, and after ALTER TYPE ...
  // CASCADE the typed tables (CREATE TABLE ... OF) of the composite type,
  // which got or changed a column without a command of their own.
  if (SPI_execute(
          "WITH d AS (SELECT objid FROM pg_catalog.pg_event_trigger_ddl_commands() "
          "WHERE classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass) "
          "SELECT objid FROM d UNION "
          "SELECT t.oid FROM d JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) "
          "d.objid JOIN pg_catalog.pg_class t ON t.reloftype OPERATOR(pg_catalog.=) "
          "c.reltype WHERE c.relkind OPERATOR(pg_catalog.=) 'c'",
          true, 0) != SPI_OK_SELECT)
    elog(ERROR, "SPI_execute failed");
  List* relids = NIL;
  for (uint64 i = 0; i < SPI_processed; ++i) {
    bool isnull;
    const Datum d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
    if (!isnull) relids = lappend_oid(relids, DatumGetObjectId(d));
  }
  const CommandTag tag = reinterpret_cast<EventTriggerData*>(fcinfo->context)->tag;
  const bool altered = tag == CMDTAG_ALTER_TABLE || tag == CMDTAG_ALTER_TYPE;
  // CREATE TABLE AS whose receiver checked every row it stored: the table it
  // made needs no validation scan.
  const bool from_query = tag == CMDTAG_CREATE_TABLE_AS || tag == CMDTAG_SELECT_INTO;
  const TableFrame* frame = current_frame;
  const Oid checked =
      from_query && frame != nullptr && frame->kind == FrameKind::Table && frame->complete
          ? frame->relid
          : InvalidOid;
  ListCell* lc;
  foreach (lc, relids) {
    const Oid relid = lfirst_oid(lc);
    ExistingRows rows = ExistingRows::Validate;
    if (altered) {
      List* tables = find_all_inheritors(relid, AccessShareLock, nullptr);
      if (!rewritten_now(tables) && !all_empty(tables)) rows = ExistingRows::NotValid;
    } else if (OidIsValid(checked) && relid == checked) {
      rows = ExistingRows::Checked;
    }
    add_sealed_checks(relid, type, sealed, rows);
  }
  if (from_query && frame == &late_frame) forget_late_frame();
  SPI_finish();
  PG_RETURN_NULL();
}

// Event trigger on table_rewrite: remembers the table, so that the sealed
// checks ddl_end adds after this ALTER TABLE validate the rewritten rows.
Datum colcrypt_table_rewrite(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._table_rewrite() is an event trigger")));
  note_rewrite(DatumGetObjectId(
      DirectFunctionCall1(pg_event_trigger_table_rewrite_oid, PointerGetDatum(nullptr))));
  PG_RETURN_NULL();
}
