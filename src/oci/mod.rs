//! containerd client: images (import, pull), snapshots, containers, tasks, runtime spec, CDI, commit (issue: command tasks).
