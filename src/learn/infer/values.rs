//! What a single value looks like: a UUID, a timestamp, an id, a token. Shape tests only; where
//! a value comes from is `provenance`'s job.

/// Whether `s` is a UUID (any version), with or without dashes.
pub(crate) fn is_uuid(s: &str) -> bool {
    let bytes = s.as_bytes();
    match bytes.len() {
        36 => bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        }),
        32 => {
            bytes.iter().all(u8::is_ascii_hexdigit)
                // A dashless UUID in a canonical layout: version nibble 1-8, variant 8-b.
                && matches!(bytes[12], b'1'..=b'8')
                && matches!(bytes[16].to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b')
        }
        _ => false,
    }
}

/// Whether `s` reads as an identifier or token (worth matching against earlier responses
/// and storage): no whitespace, at least 6 characters, and a UUID, letters mixed with digits,
/// only digits, or a long mixed-case run without separators (a token without digits).
pub(crate) fn is_id_like(s: &str) -> bool {
    let len = s.chars().count();
    if !(6..=4096).contains(&len) || s.contains(char::is_whitespace) {
        return false;
    }
    if is_uuid(s) {
        return true;
    }
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let letters = s.chars().filter(|c| c.is_alphabetic()).count();
    let upper = s.chars().any(|c| c.is_ascii_uppercase());
    let lower = s.chars().any(|c| c.is_ascii_lowercase());
    (digits >= 1 && letters >= 1 && len >= 8)
        || digits == len
        || (len >= 20 && upper && lower && s.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Whether `s` looks like a secret or a one-time value (a token, a signature, a nonce): no
/// whitespace, and a run of at least 16 token characters (letters, digits, `-`, `_`) with
/// many distinct characters, digits and letters among them. Structured static values
/// (`text/html,application/xhtml+xml;q=0.9`) have no such run.
pub(crate) fn is_high_entropy(s: &str) -> bool {
    if s.contains(char::is_whitespace) {
        return false;
    }
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .any(|run| {
            let len = run.chars().count();
            let mut distinct: Vec<char> = run.chars().collect();
            distinct.sort_unstable();
            distinct.dedup();
            let digits = run.chars().filter(char::is_ascii_digit).count();
            let letters = run.chars().filter(char::is_ascii_alphabetic).count();
            len >= 16 && distinct.len() >= 10 && digits >= 2 && letters >= 2
        })
}

/// A timestamp's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeUnit {
    Millis,
    Seconds,
}

impl TimeUnit {
    pub(crate) fn source(self) -> &'static str {
        match self {
            TimeUnit::Millis => "now_ms",
            TimeUnit::Seconds => "now_s",
        }
    }
}

/// Ten minutes, the tolerance around the recording time.
const TOLERANCE_MS: f64 = 600_000.0;

/// Whether `n` is the current time: within ten minutes of `expected_ms` (the Unix time in ms
/// the request was sent at, when the recording tells it), else by magnitude (1.6e12–2.5e12
/// is milliseconds, 1.6e9–2.5e9 seconds).
pub(crate) fn timestamp_unit(n: f64, expected_ms: Option<f64>) -> Option<TimeUnit> {
    if !n.is_finite() || n <= 0.0 {
        return None;
    }
    match expected_ms {
        Some(expected) => {
            if (n - expected).abs() <= TOLERANCE_MS {
                Some(TimeUnit::Millis)
            } else if (n * 1000.0 - expected).abs() <= TOLERANCE_MS {
                Some(TimeUnit::Seconds)
            } else {
                None
            }
        }
        None => {
            if (1.6e12..2.5e12).contains(&n) {
                Some(TimeUnit::Millis)
            } else if (1.6e9..2.5e9).contains(&n) {
                Some(TimeUnit::Seconds)
            } else {
                None
            }
        }
    }
}

/// The number a string holds when it is only digits (with at most one decimal point).
pub(crate) fn numeric_string(s: &str) -> Option<f64> {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let dots = s.chars().filter(|c| *c == '.').count();
    if digits == 0 || digits + dots != s.len() || dots > 1 {
        return None;
    }
    s.parse().ok()
}

/// `name` as a snake_case identifier (`conversationId` → `conversation_id`).
pub(crate) fn snake_case(name: &str) -> String {
    let mut out = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if previous_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            previous_lower = false;
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
            previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            previous_lower = false;
        }
    }
    out.trim_matches('_').to_owned()
}

/// A short description of a value that does not reveal it.
pub(crate) fn describe_secretly(s: &str) -> String {
    let len = s.chars().count();
    let kind = if s.chars().all(|c| c.is_ascii_hexdigit()) {
        "hex characters"
    } else if s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_' | '.'))
    {
        "base64/token characters"
    } else {
        "characters"
    };
    format!("{len} {kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_uuid("0f8fad5bd9cb469fa16570867728950e"));
        assert!(!is_uuid("0f8fad5bd9cb469fa16570867728950z"));
        assert!(!is_uuid(&"a".repeat(32)));
        assert!(is_id_like("chatcmpl-abc123xyz"));
        assert!(!is_id_like("primary_assistant"));
        assert!(!is_id_like("New chat"));
        assert!(is_high_entropy(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        ));
        assert!(!is_high_entropy("application/json"));
        assert!(!is_high_entropy(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(is_high_entropy(
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2ln"
        ));
        assert_eq!(
            timestamp_unit(1_712_345_678_123.0, None),
            Some(TimeUnit::Millis)
        );
        assert_eq!(
            timestamp_unit(1_712_345_678.5, None),
            Some(TimeUnit::Seconds)
        );
        assert_eq!(timestamp_unit(-120.0, None), None);
        assert_eq!(
            timestamp_unit(1_712_345_678_123.0, Some(1_712_345_100_000.0)),
            Some(TimeUnit::Millis)
        );
        assert_eq!(
            timestamp_unit(1_712_345_678_123.0, Some(1_812_345_000_000.0)),
            None
        );
        assert_eq!(numeric_string("1712345678123"), Some(1_712_345_678_123.0));
        assert_eq!(numeric_string("12a"), None);
        assert_eq!(snake_case("conversationId"), "conversation_id");
        assert_eq!(snake_case("request-token"), "request_token");
        assert_eq!(snake_case("X-Request-ID"), "x_request_id");
    }
}
