//! Human durations in config: `250ms`, `10s`, `1m`, `2h`, combinations like `1m30s`.
//!
//! A small parser of our own keeps the accepted syntax documented and identical across flags,
//! files and (later) resources.

use std::time::Duration;

/// Parses `"100ms"`, `"1.5s"`, `"1m30s"`. A bare number is rejected: units are never guessed.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{input:?} has no unit (use ms, s, m or h)"))?;
        if num_len == 0 {
            return Err(format!("{input:?} is not a duration like 100ms, 10s or 1m"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{input:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "{input:?}: unknown unit {other:?} (use ms, s, m or h)"
                ));
            }
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    if !total.is_finite() || total > 365.0 * 86400.0 {
        return Err(format!("{input:?} is too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10", "s", "10x", "1..2s", "ms10", "99999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trips() {
        for d in [Duration::from_millis(250), Duration::from_secs(30)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
