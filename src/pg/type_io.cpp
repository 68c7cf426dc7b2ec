// I/O functions of the type colcrypt.encrypted: a varlena holding the raw
// envelope (src/core/envelope.hpp). Text form "colcrypt:" + base64; binary
// form the raw envelope bytes. Input validates the envelope's structure; no
// I/O function ever decrypts.
//
// Text input that does not claim to be a sealed value is a plaintext
// (docs/columns.md): with the column's typmod (COPY FROM into a key-bound
// column) input seals it under the column's key, the one case where type I/O
// talks to keyd; without a typmod it becomes a pending plaintext (pending.hpp)
// for the typmod coercion that follows, and COPY into a column without a key
// refuses it. Sealed input is accepted as it is, without keyd: that is what a
// restore sends.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via the COPY state) still use `register`,
// which C++17 removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "commands/copy.h"
#include "commands/copyfrom_internal.h"
#include "fmgr.h"
#include "libpq/pqformat.h"
#include "utils/memutils.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "pg/columns.hpp"
#include "pg/guard.hpp"
#include "pg/pending.hpp"

using colcrypt::ByteView;
using colcrypt::pg::guarded;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_encrypted_in);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_out);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_recv);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_send);
}

namespace colcrypt::pg {

struct varlena* parse_sealed_text(const char* data, size_t length) {
  const std::string_view text(data, length);
  size_t capacity = 0;
  guarded(ValueOrigin::TextInput, [&] { capacity = colcrypt::decoded_size_bound(text.size()); });
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + capacity));
  size_t size = 0;
  guarded(ValueOrigin::TextInput, [&] {
    uint8_t* out = reinterpret_cast<uint8_t*>(VARDATA(result));
    size = colcrypt::decode_text(text, out, capacity);
    colcrypt::parse_header(ByteView(out, size));
  });
  SET_VARSIZE(result, VARHDRSZ + size);
  return result;
}

}  // namespace colcrypt::pg

namespace {

// COPY FROM's error context prints the field being read ("column v:
// \"123-45-6789\"") and, for an error later in the row (a constraint, a
// trigger), the whole raw line: the plaintext of this column, into the error
// and the server log. While a value of this type is read, COPY's callback is
// replaced by this one, which names the line and column only, and the row's
// raw line is marked unprintable (COPY marks the next line printable again).
void copy_context_without_value(void* arg) {
  const CopyFromState cstate = static_cast<CopyFromState>(arg);
  if (cstate->cur_attname != nullptr)
    errcontext("COPY %s, line %llu, column %s (value withheld)", cstate->cur_relname,
               static_cast<unsigned long long>(cstate->cur_lineno), cstate->cur_attname);
  else
    errcontext("COPY %s, line %llu", cstate->cur_relname,
               static_cast<unsigned long long>(cstate->cur_lineno));
}

// The COPY FROM error callback this input runs under, if any, now masked.
ErrorContextCallback* mask_copy_context() {
  for (ErrorContextCallback* c = error_context_stack; c != nullptr; c = c->previous) {
    if (c->callback != CopyFromErrorCallback) continue;
    static_cast<CopyFromState>(c->arg)->line_buf_valid = false;
    c->callback = copy_context_without_value;
    return c;
  }
  return nullptr;
}

Datum encrypted_in(FunctionCallInfo fcinfo);

}  // namespace

// encrypted_in(cstring, oid, integer)
Datum colcrypt_encrypted_in(PG_FUNCTION_ARGS) {
  // Restored on success only: after an error the COPY (and its callback) is gone.
  ErrorContextCallback* const copy = mask_copy_context();
  const Datum result = encrypted_in(fcinfo);
  if (copy != nullptr) copy->callback = CopyFromErrorCallback;
  return result;
}

namespace {

Datum encrypted_in(FunctionCallInfo fcinfo) {
  const char* input = PG_GETARG_CSTRING(0);
  const int32 typmod = PG_NARGS() > 2 ? PG_GETARG_INT32(2) : -1;
  const size_t length = std::strlen(input);
  if (colcrypt::pg::claims_sealed(input, length))
    PG_RETURN_POINTER(colcrypt::pg::parse_sealed_text(input, length));

  const ByteView plaintext(reinterpret_cast<const uint8_t*>(input), length);
  if (typmod >= 0) PG_RETURN_POINTER(colcrypt::pg::seal_for_column(typmod, plaintext));
  if (colcrypt::pg::in_copy_from())
    ereport(ERROR,
            (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
             errmsg("invalid input syntax for type colcrypt.encrypted"),
             errdetail("COPY into a colcrypt.encrypted column without a key takes sealed values "
                       "(\"colcrypt:...\") only; this one is a plaintext."),
             errhint("Declare the column as colcrypt.encrypted('key_name') to encrypt "
                     "plaintext on input.")));
  if (length > MaxAllocSize - VARHDRSZ - colcrypt::pg::kPendingOverhead)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("value too large to encrypt")));
  const size_t size = colcrypt::pg::pending_size(length);
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::TextInput, [&] {
    colcrypt::pg::seal_pending(plaintext, reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  PG_RETURN_BYTEA_P(result);
}

}  // namespace

// encrypted_out(encrypted): the canonical text form, never the plaintext.
Datum colcrypt_encrypted_out(PG_FUNCTION_ARGS) {
  bytea* value = PG_GETARG_BYTEA_PP(0);
  const ByteView envelope(reinterpret_cast<const uint8_t*>(VARDATA_ANY(value)),
                          VARSIZE_ANY_EXHDR(value));
  colcrypt::pg::reject_pending(envelope);
  // Stored bytes are printed even when they do not parse: a dump must never
  // fail on them (the restore will report them).
  size_t length = 0;
  guarded(ValueOrigin::Stored, [&] { length = colcrypt::text_size(envelope.size); });
  if (length + 1 > MaxAllocSize)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                    errmsg("colcrypt.encrypted value too large for its text form"),
                    errdetail("The text form of a %zu-byte value exceeds 1 GB.", envelope.size),
                    errhint("Use binary COPY or decrypt the value.")));
  char* out = static_cast<char*>(palloc(length + 1));
  guarded(ValueOrigin::Stored, [&] { colcrypt::encode_text(envelope, out); });
  out[length] = '\0';
  PG_RETURN_CSTRING(out);
}

// encrypted_recv(internal, oid, integer): the raw envelope, treated as hostile.
Datum colcrypt_encrypted_recv(PG_FUNCTION_ARGS) {
  StringInfo buf = reinterpret_cast<StringInfo>(PG_GETARG_POINTER(0));
  const int size = buf->len - buf->cursor;
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  pq_copymsgbytes(buf, VARDATA(result), size);
  guarded(ValueOrigin::BinaryInput, [&] {
    colcrypt::parse_header(
        ByteView(reinterpret_cast<const uint8_t*>(VARDATA(result)), static_cast<size_t>(size)));
  });
  PG_RETURN_BYTEA_P(result);
}

// encrypted_send(encrypted): the raw envelope bytes (as bytea's send does).
Datum colcrypt_encrypted_send(PG_FUNCTION_ARGS) {
  bytea* value = PG_GETARG_BYTEA_P_COPY(0);
  colcrypt::pg::reject_pending(
      ByteView(reinterpret_cast<const uint8_t*>(VARDATA(value)), VARSIZE(value) - VARHDRSZ));
  PG_RETURN_BYTEA_P(value);
}
