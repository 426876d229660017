//! libvirt VMs for VM VPS: the typed domain XML (`domain`), the NoCloud
//! seed that configures the guest (`seed`), the domains' life through
//! libvirt (`libvirt`), and what a node offers VMs (`check`). A library room: it knows nothing of the host or the runner.

pub mod check;
pub mod domain;
pub mod image;
pub mod libvirt;
pub mod seed;
mod xml;

pub use domain::{domain_name, Accel, Boot, DiskCache, DomainError, Instance, Vm, METADATA_NS};
