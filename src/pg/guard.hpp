// The one boundary between colcrypt's C++ and Postgres.
//
// Postgres reports errors with longjmp, which skips C++ destructors; C++ reports
// them with exceptions, which must never unwind through a Postgres frame. So
// every SQL-callable function does its Postgres work (detoasting, palloc, GUC
// reads) outside the C++ part, and runs the C++ part through guarded():
//
//   guarded(ValueOrigin::Stored, [&] { colcrypt::open(...); });
//
// guarded() runs the lambda inside try/catch, copies the error code, message,
// detail and hint into a plain fixed-size struct, lets every C++ object die,
// and only then calls raise_failure(), which ereports. The lambda must capture
// by reference only (so that it is trivially destructible) and must not call
// anything that can ereport.
//
// This header is Postgres-free (it is included by files that are, too).
#pragma once
#include <cstddef>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>

#include "core/error.hpp"

namespace colcrypt::pg {

// An error that carries the errdetail / errhint to show in SQL as well.
class SqlError : public Error {
 public:
  SqlError(Errc code, const std::string& message, std::string detail = {}, std::string hint = {})
      : Error(code, message), detail_(std::move(detail)), hint_(std::move(hint)) {}
  const std::string& detail() const { return detail_; }
  const std::string& hint() const { return hint_; }

 private:
  std::string detail_;
  std::string hint_;
};

// Where the bytes of a malformed envelope came from; decides its SQLSTATE.
enum class ValueOrigin {
  TextInput,    // the type's input function: 22P02
  BinaryInput,  // the type's receive function: 22P03
  Stored,       // a datum already in the database: XX001
};

// Plain data only: it outlives the C++ objects and is read by ereport.
struct GuardedFailure {
  Errc code;
  bool out_of_memory;
  char message[512];
  char detail[512];
  char hint[256];

  void set(Errc c, const char* msg, const char* det, const char* hnt) noexcept {
    code = c;
    copy(message, sizeof message, msg);
    copy(detail, sizeof detail, det);
    copy(hint, sizeof hint, hnt);
  }

 private:
  static void copy(char* out, size_t capacity, const char* in) noexcept {
    size_t n = in == nullptr ? 0 : std::strlen(in);
    if (n >= capacity) n = capacity - 1;
    if (n > 0) std::memcpy(out, in, n);
    out[n] = '\0';
  }
};

// Runs body; returns true on success, or false with failure filled in. Never
// throws: whatever body throws is caught here and every C++ object it created
// is destroyed before this returns.
template <typename Body>
bool run_guarded(Body& body, GuardedFailure& failure) noexcept {
  failure.out_of_memory = false;
  try {
    body();
    return true;
  } catch (const SqlError& e) {
    failure.set(e.code(), e.what(), e.detail().c_str(), e.hint().c_str());
  } catch (const Error& e) {
    failure.set(e.code(), e.what(), nullptr, nullptr);
  } catch (const std::bad_alloc&) {
    failure.set(Errc::Internal, "out of memory", nullptr, nullptr);
    failure.out_of_memory = true;
  } catch (const std::exception& e) {
    failure.set(Errc::Internal, e.what(), nullptr, nullptr);
  } catch (...) {
    failure.set(Errc::Internal, "unexpected C++ exception", nullptr, nullptr);
  }
  return false;
}

// Maps a failure to its SQLSTATE and raises it (src/pg/errors.cpp). Call only
// when no C++ object with a destructor is alive in the calling frames.
[[noreturn]] void raise_failure(const GuardedFailure& failure, ValueOrigin origin);

// The guarded call used by every SQL-callable function.
template <typename Body>
inline void guarded(ValueOrigin origin, Body&& body) {
  GuardedFailure failure;
  if (!run_guarded(body, failure)) raise_failure(failure, origin);
}

}  // namespace colcrypt::pg
