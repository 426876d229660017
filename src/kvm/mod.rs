//! libvirt: domain XML, qcow2 overlays, cloud-init seed, lifecycle, snapshots (issue: VM VPS, not filed yet).
