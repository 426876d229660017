//! Quotas: how much a user, and a group of users, may hold at once: GPUs,
//! running VPS, cores and memory. A request that would go over waits in
//! the queue, saying whose quota and the numbers ("lab-a holds 8 of 8
//! GPUs"); one that could never fit is refused at submit. Only what is
//! placed counts: a stopped VPS, a queued task or a request waiting for
//! approval holds nothing. The admin's own work is not counted.
//!
//! GPU time is counted too: GPU-hours had in a rolling period (a week by
//! default), from a ledger the scheduler keeps of when each task held how
//! many GPUs. Work that is placed runs on: past the cap, new GPU work waits.
//!
//! The arithmetic is here; the store applies it inside its scheduling
//! transaction, so parallel requests cannot spend the same room twice.

pub use crate::api::{QuotaCaps, QuotaScope, QuotaUse};

/// What a task holds (placed) or asks (not yet placed).
pub fn held_by(vps: bool, cores: u64, gpus: u64, memory_bytes: u64) -> QuotaUse {
    QuotaUse {
        gpus,
        vps: u64::from(vps),
        cores,
        memory_bytes,
        gpu_seconds: 0,
    }
}

/// Whether `used` plus `ask` stays within `caps` of `who` (e.g. `group
/// lab-a`); the first limit passed, in words, otherwise.
pub fn within(caps: &QuotaCaps, who: &str, used: &QuotaUse, ask: &QuotaUse) -> Result<(), String> {
    let counts = [
        (caps.gpus, used.gpus, ask.gpus, "GPUs"),
        (caps.vps, used.vps, ask.vps, "running VPS"),
        (caps.cores, used.cores, ask.cores, "cores"),
    ];
    for (cap, used, ask, what) in counts {
        if let Some(cap) = cap {
            if ask > 0 && used + ask > cap {
                return Err(format!(
                    "{who} holds {used} of {cap} {what} and this asks for {ask}"
                ));
            }
        }
    }
    // GPU time is spent as it runs: new GPU work waits while the period's is used up.
    if let Some(cap) = caps.gpu_seconds {
        if ask.gpus > 0 && used.gpu_seconds >= cap {
            return Err(format!(
                "{who} had {} of {} GPU-hours in the last {}; GPU work waits until older use ages out",
                crate::api::gpu_hours_text(used.gpu_seconds),
                crate::api::gpu_hours_text(cap),
                crate::api::period_text(caps.period())
            ));
        }
    }
    // Memory is compared in bytes and said in GiB.
    if let Some(cap) = caps.memory_bytes {
        let (used, ask) = (used.memory_bytes, ask.memory_bytes);
        if ask > 0 && used.saturating_add(ask) > cap {
            return Err(format!(
                "{who} holds {} of {} GiB of memory and this asks for {} GiB",
                gib_text(used),
                gib_text(cap),
                gib_text(ask)
            ));
        }
    }
    Ok(())
}

/// Bytes as GiB with one decimal where it is not whole.
fn gib_text(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g.fract() == 0.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.1}")
    }
}

/// Whether `ask` alone fits `caps`: a request bigger than its quota would
/// wait for ever.
pub fn could_ever_fit(caps: &QuotaCaps, who: &str, ask: &QuotaUse) -> Result<(), String> {
    within(caps, who, &QuotaUse::default(), ask).map_err(|_| {
        format!(
            "{who}'s quota ({}) is smaller than this request",
            caps.text()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_hours_read_without_trailing_zeros() {
        use crate::api::gpu_hours_text as h;
        assert_eq!(
            [h(0), h(4), h(900), h(1800), h(36_000)],
            ["0", "0.001", "0.25", "0.5", "10"]
        );
    }

    #[test]
    fn gpu_time_past_its_cap_holds_back_gpu_work_only() {
        let caps = QuotaCaps {
            gpu_seconds: Some(36_000),
            period_s: Some(86_400),
            ..Default::default()
        };
        let mut used = held_by(false, 0, 0, 0);
        used.gpu_seconds = 35_999;
        assert!(within(&caps, "user bob", &used, &held_by(false, 1, 2, 0)).is_ok());
        used.gpu_seconds = 36_000;
        assert_eq!(
            within(&caps, "user bob", &used, &held_by(false, 1, 2, 0)).unwrap_err(),
            "user bob had 10 of 10 GPU-hours in the last 1d; GPU work waits until older use ages out"
        );
        assert!(within(&caps, "user bob", &used, &held_by(true, 4, 0, 0)).is_ok());
        assert!(could_ever_fit(&caps, "user bob", &held_by(false, 1, 1, 0)).is_ok());
        let none = QuotaCaps {
            gpu_seconds: Some(0),
            ..Default::default()
        };
        assert!(could_ever_fit(&none, "user bob", &held_by(false, 1, 1, 0))
            .unwrap_err()
            .contains("0 GPU-hours per 7d"));
    }

    #[test]
    fn a_request_fits_until_the_first_limit_and_says_whose_and_how_much() {
        let caps = QuotaCaps {
            gpus: Some(8),
            vps: Some(2),
            cores: None,
            memory_bytes: Some(64 << 30),
            ..Default::default()
        };
        let used = held_by(true, 30, 7, 10 << 30);
        assert!(within(&caps, "group lab-a", &used, &held_by(false, 100, 1, 0)).is_ok());
        assert_eq!(
            within(&caps, "group lab-a", &used, &held_by(false, 1, 2, 0)).unwrap_err(),
            "group lab-a holds 7 of 8 GPUs and this asks for 2"
        );
        assert!(within(&caps, "user bob", &used, &held_by(true, 1, 0, 0)).is_ok());
        let two = held_by(true, 0, 0, 0).plus(&used);
        assert!(within(&caps, "user bob", &two, &held_by(true, 1, 0, 0))
            .unwrap_err()
            .contains("running VPS"));
        assert_eq!(
            within(&caps, "u", &used, &held_by(false, 1, 0, 60 << 30)).unwrap_err(),
            "u holds 10 of 64 GiB of memory and this asks for 60 GiB"
        );
        // Bytes, not rounded GiB: half a GiB held and 63.5 asked fit 64.
        let half = held_by(false, 0, 0, 1 << 29);
        assert!(within(
            &caps,
            "u",
            &half,
            &held_by(false, 0, 0, (63 << 30) + (1 << 29))
        )
        .is_ok());
        // Nothing asked of a capped kind passes, even when over (the cap was lowered).
        let over = held_by(false, 0, 9, 0);
        assert!(within(&caps, "u", &over, &held_by(false, 4, 0, 0)).is_ok());
        assert!(could_ever_fit(&caps, "user bob", &held_by(false, 1, 9, 0))
            .unwrap_err()
            .contains("gpus 8, vps 2, memory 64 GiB"));
    }
}
