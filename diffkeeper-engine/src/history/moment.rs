//! Naming a moment of the history: the newest state, a batch id, a time, or
//! a duration ago, resolved to the batch whose state held then. Moments
//! that compaction dropped are refused with the nearest kept ones named.

use std::time::Duration;

use crate::error::{bail, Result};

use crate::store::Reader;
use crate::units::time_millis as show;

/// A moment asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// The newest batch.
    Latest,
    /// Right after this batch committed.
    Batch(u64),
    /// This time, milliseconds since the Unix epoch.
    Time(i64),
}

impl Moment {
    /// From the `--at`, `--ago`, `--batch` options (at most one is given;
    /// clap enforces that).
    pub fn from_options(
        at: Option<&str>,
        ago: Option<Duration>,
        batch: Option<u64>,
    ) -> Result<Moment> {
        Ok(match (at, ago, batch) {
            (Some(at), _, _) => Moment::Time(parse_time(at)?),
            (_, Some(ago), _) => Moment::Time(ago_ms(ago)?),
            (_, _, Some(batch)) => Moment::Batch(batch),
            _ => Moment::Latest,
        })
    }

    /// A batch id (digits), an RFC 3339 time, or a duration ago (`10m`).
    pub fn parse(text: &str) -> Result<Moment> {
        if let Ok(batch) = text.parse::<u64>() {
            return Ok(Moment::Batch(batch));
        }
        if let Ok(ago) = humantime::parse_duration(text) {
            return Ok(Moment::Time(ago_ms(ago)?));
        }
        match parse_time(text) {
            Ok(ms) => Ok(Moment::Time(ms)),
            Err(_) => bail!(
                "{text:?} is not a batch number, an RFC 3339 time (2026-11-24T10:00:00Z) or a duration ago (10m, 2h, 3d)"
            ),
        }
    }
}

/// Milliseconds since the epoch of an RFC 3339 time (`Z` or an offset).
/// Every date RFC 3339 can write is taken, the last day of year 9999
/// included (past what a timestamp type holds).
pub fn parse_time(text: &str) -> Result<i64> {
    let e = match text.parse::<jiff::Timestamp>() {
        Ok(t) => return Ok(t.as_millisecond()),
        Err(e) => e,
    };
    match civil_ms(text) {
        Some(ms) => Ok(ms),
        None => bail!(
            "{text:?} is not an RFC 3339 time such as 2026-11-24T10:00:00Z or 2026-11-24T11:00:00+01:00: {e}"
        ),
    }
}

/// An RFC 3339 time outside a timestamp's range, computed from its date,
/// time and offset (days from the civil calendar, as in Howard Hinnant's
/// `days_from_civil`).
fn civil_ms(text: &str) -> Option<i64> {
    let pieces = jiff::fmt::temporal::Pieces::parse(text).ok()?;
    let offset = pieces.to_numeric_offset()?;
    let (date, time) = (pieces.date(), pieces.time()?);
    let (y, m, d) = (
        i64::from(date.year()),
        i64::from(date.month()),
        i64::from(date.day()),
    );
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400
        + i64::from(time.hour()) * 3600
        + i64::from(time.minute()) * 60
        + i64::from(time.second())
        - i64::from(offset.seconds());
    Some(seconds * 1000 + i64::from(time.millisecond()))
}

/// The time `ago` before now; refused when that is before 1970, earlier
/// than any capture can be.
fn ago_ms(ago: Duration) -> Result<i64> {
    let ago_ms = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
    let now = crate::store::now_ms();
    if ago_ms > now {
        bail!(
            "{} ago is before 1970, earlier than any capture",
            humantime::format_duration(ago)
        );
    }
    Ok(now - ago_ms)
}

/// The batch whose state is the state at `moment`. Errors name the moment
/// and the nearest kept batches when the store cannot show it: before the
/// first capture, dropped by compaction, or an id the store never had.
pub fn resolve(reader: &Reader, moment: Moment) -> Result<u64> {
    let batches = reader.batches()?;
    let store = reader.store_path().display();
    let (Some((first, first_rec)), Some((last, _))) = (batches.first(), batches.last()) else {
        bail!("store {store} has no batches yet");
    };
    let kept = |id: u64| batches.binary_search_by_key(&id, |(b, _)| *b);
    let describe = |i: usize| {
        let (id, rec) = &batches[i];
        format!("batch {id} at {}", show(rec.time_ms))
    };
    match moment {
        Moment::Latest => Ok(*last),
        Moment::Batch(id) => match kept(id) {
            Ok(_) => Ok(id),
            Err(_) if id == 0 => bail!("there is no batch 0: batches count from 1"),
            Err(_) if id > *last => {
                bail!("store {store} has no batch {id}: the newest is {last}")
            }
            Err(0) => bail!(
                "batch {id} was dropped by compaction; the oldest kept moment is {}",
                describe(0)
            ),
            Err(next) => bail!(
                "batch {id} was dropped by compaction; the nearest kept moments are {} and {}",
                describe(next - 1),
                describe(next)
            ),
        },
        Moment::Time(ms) => {
            let after = batches.partition_point(|(_, rec)| rec.time_ms <= ms);
            if after == 0 {
                if *first > 1 {
                    bail!(
                        "{} is before the oldest kept moment ({}); older history was dropped by compaction",
                        show(ms),
                        describe(0)
                    );
                }
                bail!(
                    "{} is before the first capture (batch {} at {})",
                    show(ms),
                    first,
                    show(first_rec.time_ms)
                );
            }
            let (id, _) = &batches[after - 1];
            let followed_by_gap = batches.get(after).is_some_and(|(next, _)| *next != id + 1);
            if followed_by_gap {
                // The kept batch's state held until the first dropped one.
                let held_until = reader.gap_after(*id)?.unwrap_or(i64::MIN);
                if ms >= held_until {
                    bail!(
                        "the state at {} was dropped by compaction; the nearest kept moments are {} and {}",
                        show(ms),
                        describe(after - 1),
                        describe(after)
                    );
                }
            }
            Ok(*id)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rfc_3339_date_is_a_time() {
        for (text, ms) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-11-24T11:00:00+01:00", 1_795_514_400_000),
            ("9999-12-31T23:59:59Z", 253_402_300_799_000),
            ("9999-12-31T23:59:59.5-01:00", 253_402_304_399_500),
        ] {
            assert_eq!(super::parse_time(text).ok(), Some(ms), "{text}");
        }
        assert!(super::parse_time("9999-13-01T00:00:00Z").is_err());
        assert!(
            super::parse_time("2026-11-24T10:00:00").is_err(),
            "no offset"
        );
        assert!(super::ago_ms(std::time::Duration::from_secs(u64::MAX / 2)).is_err());
    }
}
