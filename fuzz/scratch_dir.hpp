// A private directory for the targets that parse files (the key store, the
// audit log), made once per process and removed at its exit.
#pragma once
#include <string>

namespace colcrypt::fuzz {

// The directory (0700); dies when it cannot be made.
const std::string& scratch_dir();
// Writes data to scratch_dir()/name (mode 0600), replacing it.
void write_scratch_file(const std::string& name, const std::string& data);
std::string read_scratch_file(const std::string& name);
void remove_scratch_file(const std::string& name);

}  // namespace colcrypt::fuzz
