// colcrypt-keyd's log: one line per event on stderr (or the --log-file),
// "colcrypt-keyd: LEVEL: message". Messages never carry key bytes.
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace colcrypt::keyd {

enum class LogLevel { Error = 0, Warning = 1, Info = 2, Debug = 3 };

constexpr const char* kKeydVersion = "0.1.0";

void set_log_level(LogLevel level);
LogLevel log_level();
std::optional<LogLevel> parse_log_level(std::string_view text);

// From now on lines go to path (appended; created 0640), not stderr. Call
// before any thread logs. Throws Error(Io) when path cannot be opened.
void set_log_file(const std::string& path);
// Opens the log file's path again (logrotate moved it away): on SIGHUP. The
// new file takes the place of the old one atomically for every thread.
// Without a log file it does nothing. Failures are logged to the old file.
void reopen_log_file();

void log(LogLevel level, std::string_view message);
inline void log_error(std::string_view m) { log(LogLevel::Error, m); }
inline void log_warning(std::string_view m) { log(LogLevel::Warning, m); }
inline void log_info(std::string_view m) { log(LogLevel::Info, m); }
inline void log_debug(std::string_view m) { log(LogLevel::Debug, m); }

}  // namespace colcrypt::keyd
