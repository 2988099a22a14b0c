//! Inline credentials: a system message `URL: … | Email: … | Password: …` that names the
//! account to use (a behaviour of the tools ComputeTower replaces; off by default).
//!
//! Invariant: the message is taken out of the conversation before anything logs, stores or
//! sends it, whether the feature is on or not — with the feature off, such a request is
//! refused rather than forwarded with a password in it.

use std::fmt;

use regex::Regex;

use crate::openai::{ChatMessage, Role};

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

fn pattern() -> &'static Regex {
    static PATTERN: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| {
        // Only a fixed, valid pattern is compiled here.
        Regex::new(r"(?is)^\s*url\s*:\s*(\S+)\s*\|\s*(?:email|user(?:name)?)\s*:\s*(\S+)\s*\|\s*password\s*:\s*(.+?)\s*$")
            .unwrap_or_else(|_| unreachable!("the inline-credentials pattern is valid"))
    })
}

/// Removes the first system message that carries inline credentials and returns them.
pub fn take(messages: &mut Vec<ChatMessage>) -> Option<InlineCredentials> {
    let index = messages.iter().position(|m| {
        matches!(m.role, Role::System | Role::Developer)
            && m.content.as_str().is_some_and(|t| pattern().is_match(t))
    })?;
    let message = messages.remove(index);
    let text = message.content.as_str()?;
    let captures = pattern().captures(text)?;
    Some(InlineCredentials {
        url: captures[1].to_owned(),
        email: captures[2].to_owned(),
        password: captures[3].to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, text: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: serde_json::Value::String(text.to_owned()),
        }
    }

    #[test]
    fn takes_the_credentials_message_out() {
        let mut messages = vec![
            message(
                Role::System,
                "URL: https://chat.example.com | Email: me@example.com | Password: p|a ss",
            ),
            message(Role::User, "hello"),
        ];
        let creds = take(&mut messages).unwrap();
        assert_eq!(creds.url, "https://chat.example.com");
        assert_eq!(creds.email, "me@example.com");
        assert_eq!(creds.password, "p|a ss");
        assert_eq!(messages.len(), 1);
        assert!(!format!("{creds:?}").contains("p|a ss"));
    }

    #[test]
    fn ordinary_system_messages_and_user_messages_are_left_alone() {
        let mut messages = vec![
            message(Role::System, "You are helpful."),
            message(Role::User, "URL: x | Email: y | Password: z"),
        ];
        assert!(take(&mut messages).is_none());
        assert_eq!(messages.len(), 2);
    }
}
