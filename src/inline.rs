//! Inline credentials: a site URL, a login and a password written into a message (`URL: … |
//! Email: … | Password: …`), which names the account to use (a behaviour of the tools
//! ComputeTower replaces; off by default).
//!
//! Invariant: credentials are recognised in any message of any role, in plain strings and in
//! content parts alike, in any order, separated by `|`, `｜`, `;`, `,` or newlines, after any
//! prefix, and are taken out of the internal request (`chat::Request::take_inline_credentials`,
//! which every front door calls) before anything logs, stores or sends it — with the feature
//! off, such a request is refused rather than forwarded with a password in it.

use std::fmt;
use std::sync::OnceLock;

use regex::Regex;

#[derive(Clone, PartialEq, Eq)]
pub struct InlineCredentials {
    pub url: String,
    pub email: String,
    pub password: String,
}

impl fmt::Debug for InlineCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineCredentials")
            .field("url", &self.url)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Url,
    Login,
    Password,
}

fn keys() -> &'static Regex {
    static KEYS: OnceLock<Regex> = OnceLock::new();
    KEYS.get_or_init(|| {
        // Only a fixed, valid pattern is compiled here.
        Regex::new(
            r"(?i)\b(url|website|site|e-?mail|user(?:\s*name)?|login|account|password|passwd|pass|pwd)\s*[:：]\s*",
        )
        .unwrap_or_else(|_| unreachable!("the inline-credentials pattern is valid"))
    })
}

fn field_of(key: &str) -> Field {
    let key = key.to_ascii_lowercase();
    match key.as_str() {
        "url" | "website" | "site" => Field::Url,
        k if k.starts_with("pass") || k == "pwd" => Field::Password,
        _ => Field::Login,
    }
}

/// Credentials found in one text, and the byte range they occupy.
struct Found {
    credentials: InlineCredentials,
    span: std::ops::Range<usize>,
}

/// The first credentials line (or paragraph) in `text`.
fn find(text: &str) -> Option<Found> {
    let mut offset = 0;
    // A paragraph: lines up to a blank line. Credentials are one line or a few adjacent ones.
    for paragraph in text.split("\n\n") {
        if let Some(found) = find_in_paragraph(paragraph, offset) {
            return Some(found);
        }
        offset += paragraph.len() + 2;
    }
    None
}

fn find_in_paragraph(paragraph: &str, offset: usize) -> Option<Found> {
    let matches: Vec<regex::Captures> = keys().captures_iter(paragraph).collect();
    if matches.len() < 3 {
        return None;
    }
    let mut url = None;
    let mut login = None;
    let mut password = None;
    let mut span_end = 0;
    for (i, captures) in matches.iter().enumerate() {
        let whole = captures.get(0)?;
        let value_start = whole.end();
        let line_end = paragraph[value_start..]
            .find('\n')
            .map_or(paragraph.len(), |n| value_start + n);
        let next_key = matches
            .get(i + 1)
            .map(|c| c.get(0).map_or(0, |m| m.start()));
        let field = field_of(&captures[1]);
        // A password that ends its line keeps everything up to the line's end (it may hold
        // `|` or spaces); other values end at the next key or separator.
        let value_end = match next_key {
            Some(next) if next < line_end => next,
            _ => line_end,
        };
        let raw = &paragraph[value_start..value_end];
        let value = if field == Field::Password && value_end == line_end {
            raw.trim()
        } else {
            raw.trim_end_matches(|c: char| c.is_whitespace() || "|｜;,".contains(c))
                .trim()
        };
        if value.is_empty() {
            continue;
        }
        let slot = match field {
            Field::Url => &mut url,
            Field::Login => &mut login,
            Field::Password => &mut password,
        };
        if slot.is_none() {
            *slot = Some(value.to_owned());
            span_end = span_end.max(value_end);
        }
    }
    let url = url.filter(|u| looks_like_a_site(u))?;
    let start = matches.first()?.get(0)?.start();
    Some(Found {
        credentials: InlineCredentials {
            url,
            email: login?,
            password: password?,
        },
        span: offset + start..offset + span_end,
    })
}

fn looks_like_a_site(value: &str) -> bool {
    !value.contains(char::is_whitespace)
        && (value.contains("://") || value.contains('.') || value.starts_with("localhost"))
}

/// Takes every credentials line out of `text` and returns the first credentials found.
pub fn take_from(text: &mut String) -> Option<InlineCredentials> {
    let mut first = None;
    while let Some(found) = find(text) {
        text.replace_range(found.span, "");
        first.get_or_insert(found.credentials);
    }
    first
}

#[cfg(test)]
mod tests {
    use crate::chat::{Message, Part, Request};

    fn request(messages: Vec<Message>) -> Request {
        Request::new("m", messages)
    }

    fn system(text: &str) -> Message {
        Message::System { text: text.into() }
    }

    fn user(text: &str) -> Message {
        Message::User {
            parts: vec![Part::text(text)],
        }
    }

    #[test]
    fn takes_the_credentials_message_out() {
        let mut r = request(vec![
            system("URL: https://chat.example.com | Email: me@example.com | Password: p|a ss"),
            user("hello"),
        ]);
        let creds = r.take_inline_credentials().unwrap();
        assert_eq!(creds.url, "https://chat.example.com");
        assert_eq!(creds.email, "me@example.com");
        assert_eq!(creds.password, "p|a ss");
        assert_eq!(r.messages, vec![user("hello")]);
        assert!(!format!("{creds:?}").contains("p|a ss"));
    }

    /// Every form the old check missed (issue 15): parts, a user message, a prefix, newlines,
    /// another order, `Login:`, a full-width bar.
    #[test]
    fn every_form_is_recognised_and_removed() {
        let forms = [
            "Use this: URL: https://chat.example.com | Email: me@example.com | Password: hunter2",
            "URL: https://chat.example.com\nEmail: me@example.com\nPassword: hunter2",
            "Password: hunter2 | Email: me@example.com | URL: https://chat.example.com",
            "URL: https://chat.example.com | Login: me@example.com | Password: hunter2",
            "URL：https://chat.example.com ｜ Email：me@example.com ｜ Password：hunter2",
            "url: chat.example.com; username: me@example.com; pwd: hunter2",
        ];
        for form in forms {
            let as_part = Message::User {
                parts: vec![Part::text("question first"), Part::text(form)],
            };
            for message in [system(form), user(&format!("hi\n{form}\nthanks")), as_part] {
                let mut r = request(vec![message]);
                let creds = r
                    .take_inline_credentials()
                    .unwrap_or_else(|| panic!("missed: {form}"));
                assert_eq!(creds.password, "hunter2", "{form}");
                assert!(creds.url.contains("chat.example.com"), "{form}");
                assert_eq!(creds.email, "me@example.com", "{form}");
                let left = format!("{:?}", r.messages);
                assert!(!left.contains("hunter2"), "{form}: {left}");
            }
        }
        let mut r = request(vec![user(
            "hi\nURL: https://a.b | Email: e | Password: x\nthanks",
        )]);
        r.take_inline_credentials().unwrap();
        assert_eq!(r.messages, vec![user("hi\n\nthanks")]);
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        let texts = [
            "You are helpful.",
            "My password: is too short, says the site",
            "Reset the password: then log in at the URL: shown",
            "URL: https://a.b | Password: x",
        ];
        for text in texts {
            let mut r = request(vec![system(text), user(text)]);
            assert!(r.take_inline_credentials().is_none(), "{text}");
            assert_eq!(r.messages.len(), 2);
        }
    }
}
