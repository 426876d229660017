//! cgroup v2: the rivernode slice, per-instance cgroups, limits, stats, events, freeze/kill (issue: kernel harness and cgroup v2).
