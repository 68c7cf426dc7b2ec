#include "checks.hpp"

namespace colcrypt::fuzz {

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"envelope", check_envelope}, {"deterministic", check_deterministic},
      {"text", check_text},         {"recv", check_recv},
      {"wire", check_wire},         {"store", check_store},
      {"audit", check_audit},
  };
  return all;
}

}  // namespace colcrypt::fuzz
