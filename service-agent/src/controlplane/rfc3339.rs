//! RFC 3339 timestamps (`2024-05-01T12:00:00Z`), the way Kubernetes writes metadata times. A few
//! lines here spare the agent a date-time dependency for the one format it reads.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, de};

/// For `#[serde(deserialize_with)]` on an optional timestamp field (`null` or absent = None).
pub fn deserialize_optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SystemTime>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| {
            parse(&text).map_err(|reason| {
                de::Error::custom(format!("{text:?} is not an RFC 3339 time: {reason}"))
            })
        })
        .transpose()
}

pub fn parse(text: &str) -> Result<SystemTime, &'static str> {
    if !text.is_ascii() {
        return Err("expected only ASCII characters");
    }
    let bytes = text.as_bytes();
    if bytes.len() < 20 {
        return Err("too short for YYYY-MM-DDTHH:MM:SSZ");
    }
    let field = |start: usize, len: usize| -> Result<i64, &'static str> {
        let digits = &text[start..start + len];
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(digits.parse().expect("ASCII digits parse"))
        } else {
            Err("expected digits in YYYY-MM-DDTHH:MM:SS")
        }
    };
    let expect = |at: usize, allowed: &[u8]| {
        if allowed.contains(&bytes[at]) {
            Ok(())
        } else {
            Err("expected YYYY-MM-DDTHH:MM:SS")
        }
    };
    expect(4, b"-")?;
    expect(7, b"-")?;
    expect(10, b"Tt ")?;
    expect(13, b":")?;
    expect(16, b":")?;
    let (year, month, day) = (field(0, 4)?, field(5, 2)?, field(8, 2)?);
    let (hour, minute, second) = (field(11, 2)?, field(14, 2)?, field(17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err("no such date");
    }
    // 60 is a leap second, which RFC 3339 allows.
    if hour > 23 || minute > 59 || second > 60 {
        return Err("no such time of day");
    }

    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("expected digits after the decimal point");
        }
        // Digits past nanoseconds cannot change a SystemTime on Linux; they are ignored.
        for (position, digit) in fraction.bytes().take(digits.min(9)).enumerate() {
            nanos += u32::from(digit - b'0') * 10u32.pow(8 - position as u32);
        }
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) =>
        {
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return Err("no such UTC offset");
            }
            let magnitude = hours * 3600 + minutes * 60;
            if *sign == b'+' { magnitude } else { -magnitude }
        }
        _ => return Err("expected Z or a +HH:MM offset after the time"),
    };

    let seconds = days_since_epoch(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_seconds;
    let whole = Duration::from_secs(seconds.unsigned_abs());
    let time = if seconds >= 0 {
        SystemTime::UNIX_EPOCH + whole
    } else {
        SystemTime::UNIX_EPOCH - whole
    };
    Ok(time + Duration::from_nanos(u64::from(nanos)))
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_seconds(text: &str) -> f64 {
        parse(text)
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }

    #[test]
    fn parses_utc_times() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), 0.0);
        // `date -u -d 2024-02-29T12:34:56Z +%s`
        assert_eq!(unix_seconds("2024-02-29T12:34:56Z"), 1_709_210_096.0);
        assert_eq!(unix_seconds("2000-03-01T00:00:00Z"), 951_868_800.0);
    }

    #[test]
    fn applies_offsets_and_fractions() {
        assert_eq!(
            unix_seconds("2024-02-29T14:34:56.25+02:00"),
            1_709_210_096.25
        );
        assert_eq!(unix_seconds("2024-02-29T12:04:56-00:30"), 1_709_210_096.0);
    }

    #[test]
    fn times_before_the_epoch_work() {
        let time = parse("1969-12-31T23:59:59Z").unwrap();
        assert_eq!(
            SystemTime::UNIX_EPOCH.duration_since(time).unwrap(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn rejects_malformed_times() {
        for text in [
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+0200",
            "2024-01-01",
            "yesterday at noon, roughly",
            "2024-01-01T00:00:00.Z",
        ] {
            assert!(parse(text).is_err(), "{text} should be rejected");
        }
    }
}
