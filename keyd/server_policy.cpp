// colcrypt-keyd's peer policy: who may connect (SO_PEERCRED uid allowlists,
// fetch vs administration) and the socket itself (a private directory, a
// socket path claimed from a stale or a live keyd, created 0600/0660).
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "keyd/log.hpp"
#include "keyd/metrics_http.hpp"
#include "keyd/server_internal.hpp"

namespace colcrypt::keyd {
namespace {

sockaddr_un socket_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    throw Error(Errc::InvalidArgument, "socket path " + path + " is empty or longer than " +
                                           std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

std::string parent_dir(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void claim_socket_path(const std::string& path) {
  sockaddr_un addr = socket_address(path);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    int err = errno;
    throw SocketUnavailable("cannot check socket path " + path + ": " + errno_text(err));
  }
  if (!S_ISSOCK(st.st_mode)) {
    throw SocketUnavailable("socket path " + path + " exists and is not a socket");
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot create a socket: " + errno_text(err));
  }
  int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::close(fd);
  if (rc == 0 || err == EAGAIN || err == EINPROGRESS) {
    throw SocketUnavailable("another colcrypt-keyd is already listening on " + path);
  }
  if (err != ECONNREFUSED) {
    throw SocketUnavailable("cannot check whether " + path + " is in use: " + errno_text(err));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    err = errno;
    throw SocketUnavailable("cannot remove stale socket " + path + ": " + errno_text(err));
  }
  log_info("removed stale socket " + path);
}

bool Server::is_admin(uid_t uid) const {
  return std::find(config_.admin_uids.begin(), config_.admin_uids.end(), uid) !=
         config_.admin_uids.end();
}

bool Server::may_fetch(uid_t uid) const {
  return std::find(config_.allow_uids.begin(), config_.allow_uids.end(), uid) !=
         config_.allow_uids.end();
}

bool Server::may_connect(uid_t uid) const { return is_admin(uid) || may_fetch(uid); }

struct Server::ReloadResult {
  std::mutex mutex;
  bool done = false;
  std::optional<ReloadableSettings> settings;  // unset: the reload failed
  std::string error;
};

void Server::reload() {
  reopen_log_file();  // first: what follows goes to the new file
  unwrapped_.clear();
  if (!config_.reload) {
    log_info("SIGHUP: no --config file to read again (the log file, if any, was reopened)");
    return;
  }
  if (reload_) {
    reload_again_ = true;  // the file may have changed after the running reload read it
    return;
  }
  reload_ = std::make_shared<ReloadResult>();
  reload_thread_ = std::thread([reread = config_.reload, result = reload_] {
    std::optional<ReloadableSettings> settings;
    std::string error;
    try {
      settings = reread();
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(result->mutex);
      result->settings = std::move(settings);
      result->error = std::move(error);
      result->done = true;
    }
    wake_loop('r');
  });
}

void Server::finish_reload() {
  if (!reload_) return;
  {
    std::lock_guard<std::mutex> lock(reload_->mutex);
    if (!reload_->done) return;
  }
  reload_thread_.join();
  const std::shared_ptr<ReloadResult> result = std::move(reload_);
  reload_.reset();
  if (!result->settings) {
    log_error("SIGHUP: cannot reload " + config_.reload_source + ": " + result->error +
              "; keeping the current settings");
    audit({{"event", "reload"}, {"source", config_.reload_source}, {"result", "invalid"}});
  } else {
    apply_reload(*result->settings);
  }
  if (reload_again_ && !stopping_) {
    reload_again_ = false;
    reload();
  }
}

void Server::apply_reload(const ReloadableSettings& settings) {
  config_.allow_uids = settings.allow_uids;
  config_.admin_uids = settings.admin_uids;
  set_log_level(settings.log_level);
  audit({{"event", "reload"},
         {"source", config_.reload_source},
         {"result", "ok"},
         {"allow_uids", config_.allow_uids},
         {"admin_uids", config_.admin_uids}});
  // Requests are checked against the lists as they are now; a peer that may
  // no longer connect at all loses its kept connection.
  size_t closed = 0;
  for (auto& c : connections_) {
    if (!c->dead && !may_connect(c->uid)) {
      c->dead = true;
      ++closed;
    }
  }
  auto uid_list = [](const std::vector<uid_t>& uids) {
    std::string text;
    for (uid_t u : uids) text += (text.empty() ? "" : ",") + std::to_string(u);
    return text.empty() ? std::string("(none)") : text;
  };
  const char* level_names[] = {"error", "warning", "info", "debug"};
  log_info("SIGHUP: reloaded " + config_.reload_source + ": allow-uid " +
           uid_list(config_.allow_uids) + "; admin-uid " + uid_list(config_.admin_uids) +
           "; log-level " + level_names[static_cast<int>(settings.log_level)] +
           (closed
                ? "; closed " + std::to_string(closed) + " connections of peers no longer allowed"
                : ""));
}

void Server::listen() {
  const std::string& path = config_.socket_path;
  sockaddr_un addr = socket_address(path);
  const std::string dir = parent_dir(path);
  const mode_t dir_mode = config_.socket_group ? 0750 : 0700;
  if (::mkdir(dir.c_str(), dir_mode) == 0) {
    if (::chmod(dir.c_str(), dir_mode) != 0 ||
        (config_.socket_group &&
         ::chown(dir.c_str(), static_cast<uid_t>(-1), *config_.socket_group) != 0)) {
      int err = errno;
      throw Error(Errc::Io, "cannot set up socket directory " + dir + ": " + errno_text(err));
    }
    log_info("created socket directory " + dir);
  } else if (errno != EEXIST) {
    int err = errno;
    throw Error(Errc::Io, "cannot create socket directory " + dir + ": " + errno_text(err));
  } else {
    // Whoever can write the directory can put their own socket at this path
    // while keyd is down, and backends would fetch keys from it (encrypting
    // under an attacker's key). So the directory must be keyd's (or root's)
    // and writable by nobody else, like ssh-agent's.
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) {
      int err = errno;
      throw Error(Errc::Io, "cannot inspect socket directory " + dir + ": " + errno_text(err));
    }
    if (!S_ISDIR(st.st_mode)) {
      throw Error(Errc::InsecurePermissions, "socket directory " + dir + " is not a directory");
    }
    if (st.st_uid != ::geteuid() && st.st_uid != 0) {
      throw Error(Errc::InsecurePermissions,
                  "socket directory " + dir + " belongs to uid " + std::to_string(st.st_uid) +
                      "; it must belong to colcrypt-keyd's user or root");
    }
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
      throw Error(Errc::InsecurePermissions,
                  "socket directory " + dir +
                      " is writable by group or others; put the socket in a private directory "
                      "(e.g. /run/colcrypt)");
    }
  }

  claim_socket_path(path);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot create a socket: " + errno_text(err));
  }
  // The socket file is created under umask 0177: never briefly wider than 0600.
  mode_t old_umask = ::umask(0177);
  int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::umask(old_umask);
  if (rc != 0) {
    ::close(fd);
    throw SocketUnavailable("cannot bind " + path + ": " + errno_text(err));
  }
  listen_fd_ = fd;  // from here on the destructor removes the socket file
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    socket_dev_ = st.st_dev;
    socket_ino_ = st.st_ino;
  }
  if (::listen(fd, 128) != 0) {
    err = errno;
    throw SocketUnavailable("cannot listen on " + path + ": " + errno_text(err));
  }
  if (config_.socket_group) {
    if (::chown(path.c_str(), static_cast<uid_t>(-1), *config_.socket_group) != 0 ||
        ::chmod(path.c_str(), 0660) != 0) {
      err = errno;
      throw Error(Errc::Io, "cannot give socket " + path + " to its group: " + errno_text(err));
    }
  } else if (::chmod(path.c_str(), 0600) != 0) {
    err = errno;
    throw Error(Errc::Io, "cannot chmod socket " + path + ": " + errno_text(err));
  }
  if (metrics_http_) metrics_http_->listen();  // loopback only (MetricsHttp::check_address)
}

void Server::remove_socket() {
  // Only remove the file if it is still ours (not replaced by another keyd).
  struct stat st {};
  if (::lstat(config_.socket_path.c_str(), &st) == 0 && st.st_dev == socket_dev_ &&
      st.st_ino == socket_ino_) {
    ::unlink(config_.socket_path.c_str());
  }
}

}  // namespace colcrypt::keyd
