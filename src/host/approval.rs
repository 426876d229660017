//! Which requests wait for an operator (`pending_approval`) before they
//! hold anything: the seed's approval workflow. Only a `user`'s requests
//! ever wait; operators and the admin decide, and their own go straight
//! to the queue.

use crate::api::{Kind, TaskSpec};

use super::auth::Role;

/// The host's approval settings (`approval`, `approval_skips_cpu_only`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Approval {
    /// A user's VPS waits.
    pub vps: bool,
    /// A user's command task that asks for GPUs waits.
    pub gpu_tasks: bool,
    /// A request for no GPUs never waits.
    pub skips_cpu_only: bool,
}

impl Approval {
    /// Reads `approval` (`none`, or a comma list of `vps` and `gpu`).
    pub fn parse(list: &str, skips_cpu_only: bool) -> Result<Self, String> {
        let mut a = Approval {
            skips_cpu_only,
            ..Default::default()
        };
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "none" => {}
                "vps" => a.vps = true,
                "gpu" => a.gpu_tasks = true,
                other => {
                    return Err(format!(
                        "{other:?} is not one of none, vps, gpu (a comma list)"
                    ))
                }
            }
        }
        Ok(a)
    }

    pub fn needs_approval(&self, role: Role, spec: &TaskSpec) -> bool {
        let gpus = super::scheduler::gpus_asked(spec) > 0;
        let asked = match spec.kind {
            Kind::Vps => self.vps,
            Kind::Command => self.gpu_tasks && gpus,
        };
        // A CPU-only request skips it where the settings say so.
        let skipped = self.skips_cpu_only && !gpus;
        role == Role::User && asked && !skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind, gpus: u32) -> TaskSpec {
        let mut s: TaskSpec = serde_json::from_value(serde_json::json!({
            "command": [], "image": {"environment": "e"}, "kind": kind,
        }))
        .unwrap();
        s.gpu_count = gpus;
        s
    }

    #[test]
    fn only_a_users_requests_wait_and_only_those_the_settings_name() {
        let seed = Approval::parse("vps", false).unwrap();
        assert!(seed.needs_approval(Role::User, &spec(Kind::Vps, 0)));
        assert!(!seed.needs_approval(Role::Operator, &spec(Kind::Vps, 0)));
        assert!(!seed.needs_approval(Role::Admin, &spec(Kind::Vps, 1)));
        assert!(!seed.needs_approval(Role::User, &spec(Kind::Command, 1)));
        let gpu = Approval::parse("vps, gpu", true).unwrap();
        assert!(gpu.needs_approval(Role::User, &spec(Kind::Command, 2)));
        assert!(!gpu.needs_approval(Role::User, &spec(Kind::Command, 0)));
        assert!(
            !gpu.needs_approval(Role::User, &spec(Kind::Vps, 0)),
            "a CPU-only VPS skips it"
        );
        assert!(gpu.needs_approval(Role::User, &spec(Kind::Vps, 1)));
        let none = Approval::parse("none", false).unwrap();
        assert!(!none.needs_approval(Role::User, &spec(Kind::Vps, 4)));
        assert!(Approval::parse("vms", false).unwrap_err().contains("vms"));
    }
}
