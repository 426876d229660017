//! Idle-GPU reclamation: a VPS whose GPUs all stayed below a utilisation
//! threshold for `after` is warned (its `vps status`, and a file in the
//! instance), then, `grace` later and still idle, stopped: its disk is
//! kept, its GPUs and cores are freed. Any sample at or above the
//! threshold starts the clock again; an operator can exempt a VPS.
//!
//! The samples are the runners' NVML readings, one per heartbeat. Only a
//! fresh sample moves the clock: a node that went silent for longer than
//! `max_gap` starts again from its next sample, so an outage never counts
//! as idle time.

use std::time::Duration;

/// The settings (`idle_gpu_after`, `idle_gpu_grace`, `idle_gpu_threshold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Below this utilisation (percent) a GPU counts as idle.
    pub threshold_percent: u32,
    /// Idle this long: the VPS is warned.
    pub after: Duration,
    /// Warned this long, and idle throughout: it is stopped.
    pub grace: Duration,
    /// Samples further apart than this do not make one idle stretch.
    pub max_gap: Duration,
}

/// What the host remembers of one VPS's idleness (times in Unix ms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleMark {
    /// Since when every sample found its GPUs idle.
    pub since: Option<i64>,
    /// The last sample's time.
    pub seen: Option<i64>,
    /// When it was warned, in this idle stretch.
    pub warned: Option<i64>,
}

/// What to do after one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleStep {
    Nothing,
    /// Put up the warning (text for the user).
    Warn(String),
    /// Its GPUs were used again: take the warning down.
    Clear,
    /// Stop it, saying why.
    Stop(String),
}

impl IdlePolicy {
    /// The next mark and step for a VPS whose GPUs read `utilisation`
    /// (percent, one per GPU it holds) at `now`.
    pub fn review(&self, mark: IdleMark, utilisation: &[u32], now: i64) -> (IdleMark, IdleStep) {
        let idle = utilisation.iter().all(|&u| u < self.threshold_percent);
        if !idle {
            let step = if mark.warned.is_some() {
                IdleStep::Clear
            } else {
                IdleStep::Nothing
            };
            let fresh = IdleMark {
                since: None,
                seen: Some(now),
                warned: None,
            };
            return (fresh, step);
        }
        let gap_ok = mark
            .seen
            .is_some_and(|seen| now.saturating_sub(seen) <= ms(self.max_gap));
        let (since, warned, rewarn) = match mark.since {
            Some(since) if gap_ok => (since, mark.warned, false),
            // A first idle sample, or one after a silence: the clock starts
            // now, and a warning already up stays up, its grace starting
            // over (it is put up again with the new time).
            _ => (now, mark.warned.map(|_| now), mark.warned.is_some()),
        };
        let mut next = IdleMark {
            since: Some(since),
            seen: Some(now),
            warned,
        };
        let step = match warned {
            Some(_) if rewarn => IdleStep::Warn(self.warning(now)),
            None if now - since >= ms(self.after) => {
                next.warned = Some(now);
                IdleStep::Warn(self.warning(now))
            }
            Some(at) if now - at >= ms(self.grace) => IdleStep::Stop(format!(
                "stopped: its GPUs stayed below {}% for {} (disk kept; `vps restart` starts it again)",
                self.threshold_percent,
                words(self.after + self.grace)
            )),
            _ => IdleStep::Nothing,
        };
        (next, step)
    }

    /// The warning a VPS gets at `now`.
    fn warning(&self, now: i64) -> String {
        format!(
            "this VPS's GPUs have stayed below {}% for {}: it will be stopped at {} \
             (disk kept, GPUs freed) unless they are used before then",
            self.threshold_percent,
            words(self.after),
            utc(now + ms(self.grace)),
        )
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `2h`, `90m`, `45s`: the largest whole unit.
fn words(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A Unix time in ms as `2026-12-06 15:04:05 UTC`.
fn utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 as a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn policy() -> IdlePolicy {
        IdlePolicy {
            threshold_percent: 5,
            after: Duration::from_secs(2 * 3600),
            grace: Duration::from_secs(3600),
            max_gap: Duration::from_secs(60),
        }
    }

    /// Feeds one sample a minute from `from` to `to` (inclusive), all at `util`.
    fn run(
        p: &IdlePolicy,
        mut m: IdleMark,
        util: &[u32],
        from: i64,
        to: i64,
    ) -> (IdleMark, Vec<(i64, IdleStep)>) {
        let mut steps = vec![];
        let mut t = from;
        while t <= to {
            let (next, step) = p.review(m, util, t);
            m = next;
            if step != IdleStep::Nothing {
                steps.push((t, step));
            }
            t += 60_000;
        }
        (m, steps)
    }

    #[test]
    fn idle_gpus_are_warned_after_the_idle_time_then_stopped_after_the_grace() {
        let p = policy();
        let (_, steps) = run(&p, IdleMark::default(), &[0, 4], 0, 3 * H);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0].0, 2 * H);
        match &steps[0].1 {
            IdleStep::Warn(text) => {
                assert!(text.contains("below 5% for 2h"), "{text}");
                assert!(
                    text.contains("stopped at 1970-01-01 03:00:00 UTC"),
                    "{text}"
                );
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(steps[1].0, 3 * H);
        assert!(matches!(&steps[1].1, IdleStep::Stop(why) if why.contains("below 5% for 3h")));
    }

    #[test]
    fn one_busy_gpu_or_one_busy_sample_starts_the_clock_again() {
        let p = policy();
        // One of two GPUs at the threshold: not idle.
        let (m, steps) = run(&p, IdleMark::default(), &[0, 5], 0, 5 * H);
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(m.since, None);
        // Warned, then used during the grace: the warning comes down, no stop.
        let (m, steps) = run(&p, IdleMark::default(), &[1], 0, 2 * H + 10 * 60_000);
        assert!(matches!(steps[..], [(_, IdleStep::Warn(_))]));
        let (m, step) = p.review(m, &[80], 2 * H + 11 * 60_000);
        assert_eq!(step, IdleStep::Clear);
        assert_eq!(m.warned, None);
        // And the full idle time passes again before the next warning.
        let start = 2 * H + 12 * 60_000;
        let (_, steps) = run(&p, m, &[0], start, start + 2 * H - 60_000);
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn a_silence_longer_than_the_gap_is_not_idle_time() {
        let p = policy();
        let (m, _) = run(&p, IdleMark::default(), &[0], 0, H);
        // The node said nothing for an hour and a half, then reads idle.
        let back = H + 90 * 60_000;
        let (m, step) = p.review(m, &[0], back);
        assert_eq!(step, IdleStep::Nothing);
        assert_eq!(m.since, Some(back));
        // Warned, silent, back: the warning stays and its grace starts over.
        let warned = IdleMark {
            since: Some(0),
            seen: Some(2 * H),
            warned: Some(2 * H),
        };
        let (m, step) = p.review(warned, &[0], 4 * H);
        assert!(
            matches!(&step, IdleStep::Warn(t) if t.contains("stopped at 1970-01-01 05:00:00 UTC")),
            "the warning says the new time: {step:?}"
        );
        assert_eq!(m.warned, Some(4 * H));
        let (_, step) = p.review(m, &[0], 4 * H + 30_000);
        assert_eq!(step, IdleStep::Nothing);
    }

    #[test]
    fn times_read_as_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_569_445_000), "2026-12-06 15:04:05 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(words(Duration::from_secs(5400)), "90m");
        assert_eq!(words(Duration::from_secs(7)), "7s");
    }
}
