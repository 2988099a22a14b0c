//! Token counting (tiktoken's o200k): usage, token limits and prompt sizes. A leaf, so the
//! emulation and the wire formats can both count without depending on each other.

use std::sync::OnceLock;

use crate::role::Role;

/// Tokens of `text` in the o200k encoding. The tokenizer is built on first use (it is large),
/// so an idle server does not carry it.
pub fn count_tokens(text: &str) -> u64 {
    match bpe() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // Unreachable in practice (the table is embedded); a rough count beats no usage.
        None => text.len().div_ceil(4) as u64,
    }
}

fn bpe() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// The text of the first `n` tokens of `text` (fewer when the `n`th ends inside a character).
pub fn token_prefix(text: &str, n: usize) -> String {
    let Some(bpe) = bpe() else {
        let end = (n * 4).min(text.len());
        let end = (0..=end)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        return text[..end].to_owned();
    };
    let tokens = bpe.encode_ordinary(text);
    (0..=n.min(tokens.len()))
        .rev()
        .find_map(|k| bpe.decode(&tokens[..k]).ok())
        .unwrap_or_default()
}

/// Prompt tokens the way OpenAI counts chat messages: a few tokens of framing per message.
pub fn count_prompt_tokens(messages: &[(Role, String)]) -> u64 {
    3 + messages
        .iter()
        .map(|(role, text)| 3 + count_tokens(role.label()) + count_tokens(text))
        .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_are_plausible() {
        assert_eq!(count_tokens(""), 0);
        let n = count_tokens("Hello, world! This is a test.");
        assert!((5..=12).contains(&n), "{n}");
        assert_eq!(token_prefix("Hello, world!", 2), "Hello,");
        assert_eq!(token_prefix("Hi", 9), "Hi");
    }
}
