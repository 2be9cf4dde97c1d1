//! Retention: which batches a policy keeps ([`Policy`]), and dropping the
//! rest from the store so it stops growing ([`compact`]).
//!
//! The rules follow backup tools (restic's `forget`): the newest batch is
//! always kept; `--keep-last N` keeps the N newest; `--keep-within D` keeps
//! every batch within D of the newest one (not of now, so a store that was
//! idle for a month keeps its last week of activity); `--keep-hourly`,
//! `--keep-daily`, `--keep-weekly N` keep the newest batch of each of the N
//! most recent hours, days (UTC) or weeks (Monday to Sunday, UTC) that have
//! batches. A batch kept by any rule is kept.
//!
//! A policy can be saved in the store (`compact --save`); `compact` without
//! rules and `run`/`watch` without `--keep-*` then apply that one.

pub mod compact;

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

pub use compact::{compact, plan, CompactSummary};

use std::path::Path;

use crate::store::schema::RetentionRecord;
use crate::store::Store;

/// A retention policy. With no rule set, nothing is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    #[serde(with = "humantime_serde_opt")]
    pub keep_within: Option<Duration>,
    pub keep_last: Option<u64>,
    pub keep_hourly: Option<u64>,
    pub keep_daily: Option<u64>,
    pub keep_weekly: Option<u64>,
}

mod humantime_serde_opt {
    pub fn serialize<S: serde::Serializer>(
        value: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&super::short_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

/// The hour, day or week a commit time (ms) falls in.
type BucketOf = fn(i64) -> i64;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

impl Policy {
    /// True when no rule is set.
    pub fn is_empty(&self) -> bool {
        self == &Policy::default()
    }

    /// Refuses a policy with no rule (it would keep everything: most
    /// likely a forgotten option).
    pub fn require_rules(&self) -> crate::error::Result<()> {
        if self.is_empty() {
            crate::error::bail!(
                "no retention rule given: pass at least one of --keep-within, --keep-last, \
                 --keep-hourly, --keep-daily, --keep-weekly"
            );
        }
        Ok(())
    }

    /// The ids of the batches this policy keeps, of `batches` given as
    /// `(id, commit time ms)` in id order.
    pub fn kept(&self, batches: &[(u64, i64)]) -> BTreeSet<u64> {
        let mut kept = BTreeSet::new();
        let Some(&(newest_id, newest_ms)) = batches.last() else {
            return kept;
        };
        kept.insert(newest_id);
        if self.is_empty() {
            return batches.iter().map(|(id, _)| *id).collect();
        }
        let newest_first = || batches.iter().rev();
        if let Some(n) = self.keep_last {
            kept.extend(newest_first().take(n as usize).map(|(id, _)| *id));
        }
        if let Some(within) = self.keep_within {
            let since = newest_ms.saturating_sub(within.as_millis().min(i64::MAX as u128) as i64);
            kept.extend(
                newest_first()
                    .take_while(|(_, ms)| *ms >= since)
                    .map(|(id, _)| *id),
            );
        }
        let buckets: [(Option<u64>, BucketOf); 3] = [
            (self.keep_hourly, |ms| ms.div_euclid(HOUR_MS)),
            (self.keep_daily, |ms| ms.div_euclid(DAY_MS)),
            // Day 0 (1970-01-01) was a Thursday: +3 makes weeks start on Monday.
            (self.keep_weekly, |ms| {
                (ms.div_euclid(DAY_MS) + 3).div_euclid(7)
            }),
        ];
        for (count, bucket_of) in buckets {
            let Some(mut left) = count else { continue };
            let mut last_bucket = None;
            for &(id, ms) in newest_first() {
                if left == 0 {
                    break;
                }
                let bucket = bucket_of(ms);
                if last_bucket != Some(bucket) {
                    kept.insert(id);
                    last_bucket = Some(bucket);
                    left -= 1;
                }
            }
        }
        kept
    }
}

impl From<&Policy> for RetentionRecord {
    fn from(p: &Policy) -> RetentionRecord {
        RetentionRecord {
            keep_within_ms: p
                .keep_within
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            keep_last: p.keep_last,
            keep_hourly: p.keep_hourly,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
        }
    }
}

impl From<&RetentionRecord> for Policy {
    fn from(r: &RetentionRecord) -> Policy {
        Policy {
            keep_within: r.keep_within_ms.map(Duration::from_millis),
            keep_last: r.keep_last,
            keep_hourly: r.keep_hourly,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
        }
    }
}

/// The policy saved in the store at `store_path` (`compact --save`), if
/// the store exists and has one.
pub fn saved(store_path: &Path) -> crate::error::Result<Option<Policy>> {
    let Some(store) = Store::open_read_only(store_path)? else {
        return Ok(None);
    };
    Ok(store
        .retention()?
        .map(|r| Policy::from(&r))
        .filter(|p| !p.is_empty()))
}

/// Saves `policy` as the store's own (an empty policy forgets it).
pub fn save(store_path: &Path, policy: &Policy) -> crate::error::Result<()> {
    if !store_path.exists() {
        crate::error::bail!("no store at {}", store_path.display());
    }
    let store = Store::create_or_open(store_path)?;
    let record = (!policy.is_empty()).then(|| RetentionRecord::from(policy));
    Ok(store.set_retention(record.as_ref())?)
}

/// The rules given on the command line, or else the store's saved ones.
pub fn given_or_saved(store_path: &Path, given: &Policy) -> crate::error::Result<Option<Policy>> {
    if !given.is_empty() {
        return Ok(Some(given.clone()));
    }
    saved(store_path)
}

/// `7d`, `36h`, `90m`, `45s`: the largest whole unit, as the options take it.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(d) = self.keep_within {
            parts.push(format!("within {}", short_duration(d)));
        }
        for (name, value) in [
            ("last", self.keep_last),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
        ] {
            if let Some(n) = value {
                parts.push(format!("{name} {n}"));
            }
        }
        if parts.is_empty() {
            write!(f, "keep everything")
        } else {
            write!(f, "keep {}", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(list: &[i64]) -> Vec<(u64, i64)> {
        list.iter()
            .enumerate()
            .map(|(i, h)| (i as u64 + 1, h * HOUR_MS))
            .collect()
    }

    #[test]
    fn the_newest_batch_is_always_kept() {
        let policy = Policy {
            keep_last: Some(0),
            ..Policy::default()
        };
        assert_eq!(policy.kept(&hours(&[1, 2, 3])), BTreeSet::from([3u64]));
    }

    #[test]
    fn daily_keeps_the_newest_of_each_recent_day() {
        // Three batches on day 0, two on day 1, one on day 3.
        let batches = hours(&[1, 5, 20, 25, 30, 75]);
        let policy = Policy {
            keep_daily: Some(2),
            ..Policy::default()
        };
        // Days 3 and 1 (day 2 has no batch): their newest batches.
        assert_eq!(policy.kept(&batches), BTreeSet::from([5u64, 6]));
        let policy = Policy {
            keep_daily: Some(10),
            ..Policy::default()
        };
        assert_eq!(policy.kept(&batches), BTreeSet::from([3u64, 5, 6]));
    }

    #[test]
    fn within_counts_from_the_newest_batch_and_rules_add_up() {
        let batches = hours(&[1, 2, 10, 11, 12]);
        let policy = Policy {
            keep_within: Some(Duration::from_secs(2 * 3600)),
            keep_last: Some(1),
            keep_hourly: Some(4),
            ..Policy::default()
        };
        // Within 2 h of hour 12: 10, 11, 12; hourly 4: 12, 11, 10, 2.
        assert_eq!(policy.kept(&batches), BTreeSet::from([2u64, 3, 4, 5]));
    }
}
