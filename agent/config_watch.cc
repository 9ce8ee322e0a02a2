#include "agent/config_watch.h"

#include <sys/inotify.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Everything that can change what the path resolves to or what it holds.
constexpr uint32_t kDirEvents = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM |
                                IN_CREATE | IN_DELETE | IN_ATTRIB |
                                IN_DELETE_SELF | IN_MOVE_SELF;

std::string DirOf(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

ConfigFileWatcher::ConfigFileWatcher(EventLoop* loop, std::string path,
                                     ConfigWatchOptions options,
                                     std::function<void()> on_change)
    : loop_(loop),
      path_(std::move(path)),
      options_(options),
      on_change_(std::move(on_change)) {}

ConfigFileWatcher::~ConfigFileWatcher() {
  if (debounce_timer_ != 0) loop_->CancelTimer(debounce_timer_);
  if (poll_timer_ != 0) loop_->CancelTimer(poll_timer_);
  if (inotify_) loop_->RemoveFd(inotify_.get());
}

absl::Status ConfigFileWatcher::Start() {
  inotify_ = Fd(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!inotify_) return ErrnoError("inotify_init1 for the config file");
  const std::string dir = DirOf(path_);
  dir_watch_ = ::inotify_add_watch(inotify_.get(), dir.c_str(), kDirEvents);
  if (dir_watch_ < 0) {
    return ErrnoError(absl::StrCat("watching directory ", dir,
                                   " of the config file ", path_));
  }
  WatchTargetDirectory();
  RETURN_IF_ERROR(
      loop_->AddFd(inotify_.get(), [this](uint32_t) { OnReadable(); }));
  poll_timer_ = loop_->AddTimer(options_.poll, [this] {
    poll_timer_ = 0;
    Fire();
  });
  return absl::OkStatus();
}

void ConfigFileWatcher::WatchTargetDirectory() {
  char resolved[PATH_MAX];
  std::string target_dir;
  if (::realpath(path_.c_str(), resolved) != nullptr) {
    target_dir = DirOf(resolved);
    char own[PATH_MAX];
    if (::realpath(DirOf(path_).c_str(), own) != nullptr && target_dir == own) {
      target_dir.clear();  // the directory already watched
    }
  }
  if (target_dir == target_dir_) return;
  if (target_watch_ >= 0) {
    ::inotify_rm_watch(inotify_.get(), target_watch_);
    target_watch_ = -1;
  }
  target_dir_ = target_dir;
  if (target_dir_.empty()) return;
  target_watch_ =
      ::inotify_add_watch(inotify_.get(), target_dir_.c_str(), kDirEvents);
  if (target_watch_ < 0) {
    // The periodic check still sees changes there.
    PF_LOG(WARNING) << "config file " << path_ << ": cannot watch "
                    << target_dir_ << " (the directory of its target): "
                    << ErrnoError("inotify_add_watch").message();
  }
}

void ConfigFileWatcher::OnReadable() {
  alignas(inotify_event) char buf[4096];
  bool any = false;
  for (;;) {
    ssize_t n = ::read(inotify_.get(), buf, sizeof(buf));
    if (n <= 0) break;
    any = true;
    for (ssize_t off = 0; off < n;) {
      const auto* ev = reinterpret_cast<const inotify_event*>(buf + off);
      if ((ev->mask & IN_IGNORED) != 0) {
        // The directory itself went away (or was replaced): watch anew.
        if (ev->wd == dir_watch_) {
          dir_watch_ = ::inotify_add_watch(inotify_.get(), DirOf(path_).c_str(),
                                           kDirEvents);
        } else if (ev->wd == target_watch_) {
          target_watch_ = -1;
          target_dir_.clear();
        }
      }
      off += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
    }
  }
  if (!any) return;
  WatchTargetDirectory();
  if (debounce_timer_ == 0) {
    debounce_timer_ = loop_->AddTimer(options_.debounce, [this] {
      debounce_timer_ = 0;
      Fire();
    });
  }
}

void ConfigFileWatcher::Fire() {
  if (poll_timer_ != 0) loop_->CancelTimer(poll_timer_);
  poll_timer_ = loop_->AddTimer(options_.poll, [this] {
    poll_timer_ = 0;
    Fire();
  });
  on_change_();
}

}  // namespace portfleet
