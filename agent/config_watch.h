// ConfigFileWatcher: tells the agent's loop when a config file may have
// changed, however it was changed:
//  - the kubelet's ConfigMap volume: `fleet.textproto -> ..data/...` and an
//    atomic rename of a new `..data` symlink into the directory;
//  - editors that write a temp file and rename it over the file;
//  - in-place writes;
//  - a symlink to a file in another directory (its directory is watched too).
// inotify on the file's directory (and on its target's directory) wakes the
// loop; events are coalesced for `debounce`, and a slow periodic check
// (`poll`) covers what inotify cannot see (e.g. a bind mount replaced from
// outside). The watcher only says "look again"; the caller reads the file
// and compares its bytes.
#ifndef PORTFLEET_AGENT_CONFIG_WATCH_H_
#define PORTFLEET_AGENT_CONFIG_WATCH_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "agent/event_loop.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

struct ConfigWatchOptions {
  // Events within this time are one change.
  absl::Duration debounce = absl::Milliseconds(100);
  // Look again this often even without an event.
  absl::Duration poll = absl::Seconds(10);
};

class ConfigFileWatcher {
 public:
  // `loop` (not owned) must outlive the watcher; `on_change` runs on it.
  ConfigFileWatcher(EventLoop* loop, std::string path,
                    ConfigWatchOptions options,
                    std::function<void()> on_change);
  ~ConfigFileWatcher();
  ConfigFileWatcher(const ConfigFileWatcher&) = delete;
  ConfigFileWatcher& operator=(const ConfigFileWatcher&) = delete;

  // Opens inotify and watches the directories; errors name the directory.
  absl::Status Start();

 private:
  void OnReadable();
  // (Re)watches the directory of the symlink's target when it is not the
  // file's own directory.
  void WatchTargetDirectory();
  void Fire();

  EventLoop* loop_;
  const std::string path_;
  const ConfigWatchOptions options_;
  std::function<void()> on_change_;
  Fd inotify_;
  int dir_watch_ = -1;
  int target_watch_ = -1;
  std::string target_dir_;
  EventLoop::TimerId debounce_timer_ = 0;
  EventLoop::TimerId poll_timer_ = 0;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_CONFIG_WATCH_H_
